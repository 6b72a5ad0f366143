"""MESSAGE frames: ceph_msg_header2, the asyncmsgr (msgpack) and Ceph (raw) families,
zero-copy data, malformed input."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.frames import FrameDecoder, Tag, encode_frame
from protocol.message import (
    ASYNCMSGR_TYPE_BASE,
    HEADER,
    PRIO_DEFAULT,
    PRIO_HIGH,
    PRIO_HIGHEST,
    PRIO_LOW,
    Message,
    check_outgoing,
    decode_message,
    message_segments,
)


def through_wire(msg: Message, seq: int = 1, ack_seq: int = 0) -> Message:
    dec = FrameDecoder()
    dec.feed(b"".join(encode_frame(Tag.MESSAGE, message_segments(msg, seq, ack_seq))))
    frame = dec.next_frame()
    assert frame is not None and frame.tag == Tag.MESSAGE
    return decode_message(frame.segments)


def views(*segs: bytes) -> list[memoryview]:
    return [memoryview(s) for s in segs]


def hdr(mtype: int = ASYNCMSGR_TYPE_BASE + 1, pad: int = 0) -> bytes:
    """A ceph_msg_header2: seq 1, an asyncmsgr type by default."""
    return HEADER.pack(1, 0, mtype, 127, 1, pad, 0, 0, 0, 1, 0)


def test_priority_constants() -> None:
    assert (PRIO_LOW, PRIO_DEFAULT, PRIO_HIGH, PRIO_HIGHEST) == (64, 127, 196, 255)
    assert Message(1).priority == PRIO_DEFAULT


def test_header_layout() -> None:
    assert HEADER.size == 41
    seg = message_segments(Message(0x1234, priority=200, tid=7, flags=9), seq=5, ack_seq=4)[0]
    # seq, tid, type (asyncmsgr family), priority, version, pad, data_off, ack, flags, compat
    assert seg == HEADER.pack(5, 7, ASYNCMSGR_TYPE_BASE + 0x1234, 200, 1, 0, 0, 4, 9, 1, 0)
    ceph = Message(19, b"front", raw=True, version=2, compat_version=1)
    assert message_segments(ceph, 3, 2)[0] == HEADER.pack(3, 0, 19, 127, 2, 0, 0, 2, 0, 1, 0)


def test_data_is_segment_3_with_an_empty_middle() -> None:
    segs = message_segments(Message(1, "f", b"data"), 1, 0)
    assert [bytes(s) for s in segs[1:]] == [msgpack.packb("f"), b"", b"data"]
    wire = b"".join(encode_frame(Tag.MESSAGE, segs))
    assert wire[1] == 4 and wire[20:26] == b"\x04\x00\x00\x00\x00\x10"  # len 4, align 4096


def test_ceph_message_round_trip() -> None:
    msg = Message(51, b"\x01front", b"out", raw=True, middle=b"mid", version=3, compat_version=2)
    got = through_wire(msg, seq=4, ack_seq=1)
    assert (got.raw, got.type, got.front, bytes(got.middle), bytes(got.data), got.version,
            got.compat_version) == (True, 51, b"\x01front", b"mid", b"out", 3, 2)


def test_peer_without_asyncmsgr_gets_every_message_raw() -> None:
    segs = message_segments(Message(7, {"a": 1}), 1, 0)
    got = decode_message(views(*(bytes(s) for s in segs)), asyncmsgr=False)
    assert got.raw and got.type == ASYNCMSGR_TYPE_BASE + 7
    assert got.front == msgpack.packb({"a": 1})


def test_ceph_front_must_be_bytes() -> None:
    with pytest.raises(LocalProtocolError, match="front must be bytes"):
        message_segments(Message(2, {"not": "bytes"}, raw=True), 1, 0)


def test_asyncmsgr_message_to_a_ceph_peer_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="Ceph daemon") as info:
        check_outgoing(Message(1, "x"), ceph_peer=True)
    assert info.value.code == "ceph_peer"
    check_outgoing(Message(2, b"", raw=True), ceph_peer=True)


def test_round_trip() -> None:
    msg = Message(42, {"k": [1, "two", b"\x03"], 5: None}, b"raw\x00data", PRIO_HIGH, 77, 3)
    got = through_wire(msg, seq=9, ack_seq=8)
    assert (got.type, got.front, bytes(got.data), got.priority, got.tid, got.flags,
            got.seq, got.ack_seq) == (42, {"k": [1, "two", b"\x03"], 5: None}, b"raw\x00data",
                                      PRIO_HIGH, 77, 3, 9, 8)
    assert msg.seq == 0  # message_segments leaves the session's bookkeeping alone


def test_header_only_message_is_one_segment() -> None:
    segs = message_segments(Message(1), 1, 0)
    assert len(segs) == 1  # empty front, middle and data trimmed
    wire = b"".join(encode_frame(Tag.MESSAGE, segs))
    assert wire[1] == 1  # trailing empty front trimmed
    got = through_wire(Message(1))
    assert got.front is None and got.data == b""


def test_data_only_message() -> None:
    got = through_wire(Message(3, None, b"x" * 5000))
    assert got.front is None and bytes(got.data) == b"x" * 5000


@settings(max_examples=examples(100), deadline=None)
@given(st.integers(0, 0x7FFF),
       st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text()
                    | st.binary() | st.floats(allow_nan=False),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=10),
       st.binary(max_size=300), st.integers(0, 65535), st.integers(0, 2**64 - 1))
def test_hypothesis_round_trip(mtype: int, front: Any, data: bytes, prio: int, tid: int) -> None:
    got = through_wire(Message(mtype, front, data, prio, tid))
    assert (got.type, got.front, bytes(got.data), got.priority, got.tid) == \
        (mtype, front, data, prio, tid)


def test_data_is_not_copied() -> None:
    header, front = message_segments(Message(1, "f", b"x"), 1, 0)[:2]
    backing = bytearray(b"payload")
    data_view = memoryview(backing)
    msg = decode_message([memoryview(header), memoryview(front), memoryview(b""), data_view])
    assert msg.data is data_view
    backing[0:1] = b"P"  # same memory: the change shows through the message
    assert bytes(msg.data) == b"Payload"


def test_data_shares_the_frame_buffer() -> None:
    dec = FrameDecoder()
    view = dec.get_buffer()
    wire = b"".join(encode_frame(Tag.MESSAGE, message_segments(Message(1, None, b"d" * 64), 1, 0)))
    view[:len(wire)] = wire
    dec.buffer_updated(len(wire))
    frame = dec.next_frame()
    assert frame is not None
    msg = decode_message(frame.segments)
    assert isinstance(msg.data, memoryview) and msg.data.obj is view.obj


def test_encoded_front_is_cached() -> None:
    msg = Message(1, {"a": 1})
    first = msg.encoded_front()
    msg.front = {"a": 2}  # a resend must carry the bytes of the first send
    assert msg.encoded_front() is first
    assert Message(1, None).encoded_front() == b""


@pytest.mark.parametrize("size", [0, 32, 40, 42, 64])
def test_bad_header_size(size: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(views(b"h" * size))
    assert info.value.code == "bad_header"


def test_data_pre_padding_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="padding"):
        decode_message(views(hdr(pad=1)))


def test_segment_count_checked() -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message([])
    with pytest.raises(RemoteProtocolError):
        decode_message(views(hdr(), b"", b"", b"x", b"y"))


GOOD = msgpack.packb({"k": [1, 2, 3], "s": "text"}, use_bin_type=True)


@pytest.mark.parametrize("front", [
    GOOD[:-1],                 # truncated
    GOOD + b"\x01",            # extra object after the first
    b"\xc1",                   # never-used type byte
    b"\xa2\xff\xfe",           # str that is not UTF-8
    b"\x81\x91\x01\x01",       # map with an unhashable (list) key
    b"\xdd\xff\xff\xff\xff",   # array announcing 4G entries in 5 bytes
    b"\xc6\xff\xff\xff\xff",   # bin announcing 4 GiB
    b"\x91" * 5000 + b"\x01",  # nesting too deep
])
def test_bad_msgpack(front: bytes) -> None:
    h = hdr()
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(views(h, front))
    assert info.value.code == "bad_msgpack"


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(min_size=1, max_size=60))
def test_random_front_only_remote_errors(front: bytes) -> None:
    h = hdr()
    try:
        decode_message(views(h, front))
    except RemoteProtocolError as exc:
        assert exc.code == "bad_msgpack"


def test_front_cap() -> None:
    h = hdr()
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(views(h, msgpack.packb("x" * 100)), max_front=50)
    assert info.value.code == "oversize"


@pytest.mark.parametrize("msg", [Message(0x8000), Message(70000, raw=True),
                                 Message(1, priority=65536), Message(1, tid=-1),
                                 Message(1, flags=256), Message(1, front=object()),
                                 Message(1, version=-1)])
def test_encode_rejects_bad_fields(msg: Message) -> None:
    with pytest.raises(LocalProtocolError):
        message_segments(msg, 1, 0)


def test_message_equality_is_identity() -> None:
    assert Message(1) != Message(1)
    m = Message(1)
    assert m in [m] and m not in [Message(1)]
