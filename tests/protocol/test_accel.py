"""The compiled frame path (protocol._accel) against the pure-Python reference.

Differential: every input goes through both, and both must give the same bytes (encode,
CRC) or the same decision (scan: the same segments and end offset, or both "not on the
fast path"). Inputs: random segment sizes and buffer types, every truncation, every
single-bit flip, and preambles with hostile lengths whose CRC is recomputed so that
only the length checks stand between them and a read past the buffer.
"""

from __future__ import annotations

import operator
import os
import struct
import subprocess
import sys
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol import accel
from protocol.ceph.header import HEADER2
from protocol.crc import crc32c
from protocol.frame_encoder import encode_message_frame_python as encode_message_frame
from protocol.frames import FrameDecoder, FrameLimits, encode_banner
from protocol.errors import LocalProtocolError
from protocol.message import (
    Message, decode_messages_python, encode_messages, encode_messages_python,
)

from ..fuzzing import examples
from .test_receive_batch import _fields, messages as batch_messages, _stream as batch_stream

if accel.ACCEL is None and os.environ.get("ASYNCMSGR_REQUIRE_EXTENSIONS") == "1":
    pytest.fail(f"the compiled path is required here and missing: {accel.REASON}",
                pytrace=False)
pytestmark = pytest.mark.skipif(accel.ACCEL is None,
                                reason=f"no compiled path: {accel.REASON}")
A = accel.ACCEL
BANNER = encode_banner(0, 0)
LIMITS = FrameLimits(segment_max=1 << 16, data_max=1 << 20)


def _join(bufs: list[bytes | bytearray | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def _reference_scan(stream: bytes, limits: FrameLimits = LIMITS
                    ) -> tuple[int, list[bytes]] | None:
    """Pure Python: the decoder's fast path on ``stream`` (after a banner)."""
    dec = FrameDecoder(limits)
    dec.feed(BANNER + stream)
    assert dec.next_banner() is not None
    before = dec.buffered
    segs = dec.next_message_python()
    if segs is None:
        return None
    return before - dec.buffered, [bytes(s) for s in segs]


def _compiled_scan(stream: bytes, limits: FrameLimits = LIMITS
                   ) -> tuple[int, list[bytes]] | None:
    assert A is not None
    # offset by a prefix, as in a real receive buffer where earlier frames were consumed
    pad = 7
    mv = memoryview(bytearray(b"\xaa" * pad + stream + b"\x55" * 5))
    r = A.scan_message(mv, pad, pad + len(stream), limits.segment_max, limits.data_max)
    if r is None:
        return None
    end, segs = r
    return end - pad, [bytes(s) for s in segs]


sizes = st.sampled_from([0, 1, 3, 8, 40, 63, 64, 65, 4095, 4096, 4097, 9000])


@given(st.binary(max_size=9000), st.integers(0, 0xFFFFFFFF))
@settings(max_examples=examples(300), deadline=None)
@example(b"", 0).via("empty data returns the seed")
@example(b"123456789", 0xFFFFFFFF).via("the check value")
def test_crc32c_matches(data: bytes, seed: int) -> None:
    assert A is not None
    assert A.crc32c(data, seed) == crc32c(data, seed)
    assert A.crc32c(memoryview(data)[1:], seed) == crc32c(data[1:], seed)


def test_crc32c_refuses_a_seed_over_32_bits() -> None:
    assert A is not None
    with pytest.raises((ValueError, OverflowError)):
        A.crc32c(b"x", 1 << 32)


@given(sizes, sizes, sizes, st.sampled_from([bytes, bytearray, memoryview]))
@settings(max_examples=examples(200), deadline=None)
def test_encode_message_frame_matches(hl: int, fl: int, dl: int, kind: type) -> None:
    assert A is not None
    header, front, data = (os.urandom(n) for n in (hl, fl, dl))
    typed = kind(data) if kind is not memoryview else memoryview(bytearray(data))
    ref = encode_message_frame(header, front, typed)
    got = A.encode_message_frame(header, front, typed)
    assert [bytes(b) for b in got] == [bytes(b) for b in ref]
    if len(got) == 3:
        assert got[1] is typed  # big data is sent from the caller's buffer, not copied


@given(st.integers(1, 200), sizes, sizes)
@settings(max_examples=examples(100), deadline=None)
def test_scan_agrees_on_whole_frames_and_every_truncation(hl: int, fl: int, dl: int) -> None:
    frame = _join(encode_message_frame(os.urandom(hl), os.urandom(fl), os.urandom(dl)))
    full = _reference_scan(frame)
    assert full is not None and full[0] == len(frame)
    assert _compiled_scan(frame) == full
    assert _compiled_scan(frame + b"trailing") == full  # stops at the frame's end
    for cut in range(len(frame)):
        assert _compiled_scan(frame[:cut]) is None is _reference_scan(frame[:cut])


@given(st.integers(1, 64), st.sampled_from([0, 5, 64]), st.sampled_from([0, 9, 300]),
       st.data())
@settings(max_examples=examples(100), deadline=None)
def test_scan_agrees_on_every_bit_flip(hl: int, fl: int, dl: int, data: st.DataObject) -> None:
    frame = bytearray(_join(encode_message_frame(os.urandom(hl), os.urandom(fl),
                                                 os.urandom(dl))))
    bits = data.draw(st.lists(st.integers(0, len(frame) * 8 - 1), min_size=1, max_size=40,
                              unique=True))
    for bit in bits:
        frame[bit // 8] ^= 1 << (bit % 8)
        assert _compiled_scan(bytes(frame)) == _reference_scan(bytes(frame)), bit
        frame[bit // 8] ^= 1 << (bit % 8)


_PRE = struct.Struct("<BBIHIHIHIHBB")
hostile = st.sampled_from([0, 1, 35, 4096, 1 << 16, (1 << 16) + 1, 1 << 20, (1 << 20) + 1,
                           (1 << 31) - 1, 1 << 31, 0xFFFFFFFF])


@given(st.integers(0, 255), st.integers(0, 255), hostile, hostile, hostile, hostile,
       st.binary(max_size=300))
@settings(max_examples=examples(300), deadline=None)
@example(17, 4, 0xFFFFFFFF, 0xFFFFFFFF, 0, 0xFFFFFFFF, b"").via("lengths that wrap 32 bits")
@example(17, 1, 1 << 16, 0, 0, 0, b"x" * 40).via("a header at the cap, body missing")
def test_scan_agrees_on_hostile_preambles(tag: int, nseg: int, l0: int, l1: int, l2: int,
                                          l3: int, body: bytes) -> None:
    pre = _PRE.pack(tag, nseg, l0, 8, l1, 8, l2, 8, l3, 4096, 0, 0)
    stream = pre + struct.pack("<I", crc32c(pre, 0)) + body
    assert _compiled_scan(stream) == _reference_scan(stream)


@pytest.mark.parametrize("limits", [FrameLimits(segment_max=40, data_max=8),
                                    FrameLimits(segment_max=39, data_max=8),
                                    FrameLimits(segment_max=40, data_max=7)])
def test_scan_honours_the_limits(limits: FrameLimits) -> None:
    frame = _join(encode_message_frame(os.urandom(40), os.urandom(10), os.urandom(8)))
    assert _compiled_scan(frame, limits) == _reference_scan(frame, limits)


def test_scan_refuses_offsets_outside_the_buffer() -> None:
    assert A is not None
    mv = memoryview(bytearray(64))
    for start, end in ((0, 65), (-1, 10), (20, 10)):
        with pytest.raises(ValueError, match="outside the buffer"):
            A.scan_message(mv, start, end, 100, 100)
    with pytest.raises(TypeError):
        A.scan_message(b"not a memoryview", 0, 0, 1, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("value, expect", [("1", "python"), ("0", None), ("", None)])
def test_the_environment_can_force_the_pure_python_path(value: str, expect: str | None) -> None:
    env = dict(os.environ, ASYNCMSGR_NO_EXTENSIONS=value)
    out = subprocess.run([sys.executable, "-c",
                          "from protocol import accel; print(accel.IMPLEMENTATION, "
                          "accel.describe())"],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    impl = out.stdout.split()[0]
    assert impl == (expect or accel.IMPLEMENTATION)
    if expect == "python":
        assert "ASYNCMSGR_NO_EXTENSIONS" in out.stdout


u64 = st.integers(0, (1 << 64) - 1)
u16 = st.integers(0, 0xFFFF)


@given(u64, u64, u16, u16, u16, u64, st.integers(0, 0xFF), u16, sizes, sizes)
@settings(max_examples=examples(200), deadline=None)
def test_encode_message_matches_header_pack_and_frame(seq: int, tid: int, t: int, prio: int,
                                                      version: int, ack: int, flags: int,
                                                      compat: int, fl: int, dl: int) -> None:
    assert A is not None
    front, data = os.urandom(fl), os.urandom(dl)
    header = HEADER2.pack(seq, tid, t, prio, version, 0, 0, ack, flags, compat, 0)
    ref = encode_message_frame(header, front, data)
    got = A.encode_message(seq, tid, t, prio, version, ack, flags, compat, front, data)
    assert [bytes(b) for b in got] == [bytes(b) for b in ref]


@pytest.mark.parametrize("field, value", [(0, -1), (0, 1 << 64), (2, 1 << 16), (3, -1),
                                          (6, 256), (7, 1 << 16), (1, 1.5), (5, None)])
def test_encode_message_refuses_what_the_header_cannot_hold(field: int, value: object) -> None:
    assert A is not None
    args: list[object] = [1, 2, 3, 4, 5, 6, 7, 8, b"", b""]
    args[field] = value
    with pytest.raises((OverflowError, TypeError)):
        A.encode_message(*args)  # type: ignore[arg-type]
    with pytest.raises(struct.error):  # the Python packer refuses the same values
        HEADER2.pack(*args[:5], 0, 0, *args[5:8], 0)  # type: ignore[arg-type]


def test_the_decoder_and_encoder_run_the_compiled_path() -> None:
    """Where the extension is built, the per-message path uses it (not only the tests)."""
    from protocol import frame_decoder, frame_encoder

    assert FrameDecoder.next_message is not FrameDecoder.next_message_python
    assert frame_encoder.encode_message_frame is not encode_message_frame
    frame = _join(encode_message_frame(b"h" * 41, b"front", b"data"))
    dec = FrameDecoder(LIMITS)
    dec.feed(BANNER + frame)
    assert dec.next_banner() is not None
    segs = dec.next_message()
    assert segs is not None and [bytes(x) for x in segs] == [b"h" * 41, b"front", b"", b"data"]
    assert frame_decoder.ACCEL is A
    from protocol import message

    assert message.decode_messages is A.decode_messages


def _both_batches(stream: bytes, max_front: int = 1 << 24, asyncmsgr: bool = True,
                  limit: int = 64) -> tuple[object, object]:
    """The receive batch of ``stream`` (after a prefix, as in a real buffer) on both paths,
    as comparable values: the messages' fields, the end offsets, the highest ack."""
    assert A is not None
    pad = 5
    mv = memoryview(bytearray(b"\xaa" * pad + stream + b"\x55" * 3))
    args = (mv, pad, pad + len(stream), LIMITS.segment_max, LIMITS.data_max, max_front,
            asyncmsgr, limit)
    out = []
    for impl in (A.decode_messages, decode_messages_python):
        msgs, ends, ack = impl(*args)
        out.append(([_fields(m) for m in msgs], ends, ack))
    return out[0], out[1]


@given(st.lists(batch_messages, max_size=6), st.booleans(), st.integers(1, 7))
@settings(max_examples=examples(200), deadline=None)
def test_decode_messages_matches_the_pure_batch(msgs: list[Message], asyncmsgr: bool,
                                                limit: int) -> None:
    stream = batch_stream(msgs)
    compiled, pure = _both_batches(stream, asyncmsgr=asyncmsgr, limit=limit)
    assert compiled == pure
    for cut in range(0, len(stream), max(1, len(stream) // 30)):
        assert operator.eq(*_both_batches(stream[:cut], asyncmsgr=asyncmsgr))


@given(st.lists(batch_messages, min_size=1, max_size=3), st.data())
@settings(max_examples=examples(100), deadline=None)
def test_decode_messages_matches_after_bit_flips_and_small_front_caps(
        msgs: list[Message], data: st.DataObject) -> None:
    stream = bytearray(batch_stream(msgs))
    for _ in range(10):
        bit = data.draw(st.integers(0, len(stream) * 8 - 1))
        stream[bit // 8] ^= 1 << (bit % 8)
        assert operator.eq(*_both_batches(bytes(stream))), bit
        stream[bit // 8] ^= 1 << (bit % 8)
    cap = data.draw(st.integers(0, 64))
    assert operator.eq(*_both_batches(bytes(stream), max_front=cap))


def test_decode_messages_refuses_offsets_outside_the_buffer() -> None:
    assert A is not None
    mv = memoryview(bytearray(10))
    for start, end in ((-1, 5), (0, 11), (6, 5)):
        with pytest.raises(ValueError):
            A.decode_messages(mv, start, end, 100, 100, 100, True, 8)
    with pytest.raises(TypeError):
        A.decode_messages(b"not a memoryview", 0, 0, 1, 1, 1, True, 1)  # type: ignore[arg-type]


send_messages = st.builds(
    lambda t, front, data, raw, middle, cached, seq: _numbered(
        Message(t, str(front).encode() if raw else front, data, raw=raw, middle=middle),
        seq, cached),
    st.integers(-2, 0x10001), st.none() | st.integers() | st.text(max_size=9),
    st.sampled_from([0, 1, 64, 4096, 4097, 10000]).map(bytes), st.booleans(),
    st.sampled_from([b"", b"", b"", b"mid"]), st.booleans(), st.integers(0, (1 << 64) - 1))


def _numbered(msg: Message, seq: int, cached: bool) -> Message:
    msg.seq, msg.ack_seq = seq, seq // 2
    if cached:
        try:
            msg.encoded_front()
        except LocalProtocolError:
            pass
    return msg


def _encoded(fn: Callable[..., None], batch: list[Message], peer: bool) -> object:
    out: list[bytes | bytearray | memoryview] = []
    try:
        fn(batch, peer, out)
    except LocalProtocolError as err:
        return ("error", err.code, err.reason, _join(out))
    return _join(out)


@given(st.lists(send_messages, max_size=8), st.booleans())
@settings(max_examples=examples(300), deadline=None)
def test_encode_batch_writes_the_bytes_of_one_message_at_a_time(batch: list[Message],
                                                               peer: bool) -> None:
    """The same bytes, or the same error after the same bytes, for batches mixing what
    the compiled batch takes with what it leaves to Python (a middle, a front not yet
    encoded, types out of range, asyncmsgr messages for a Ceph peer, split data)."""
    assert _encoded(encode_messages, batch, peer) == _encoded(encode_messages_python, batch, peer)


def test_encode_batch_joins_small_frames_and_keeps_big_data_uncopied() -> None:
    assert A is not None
    big = bytearray(10000)
    batch = [Message(1, "a", seq=1), Message(2, None, big, seq=2), Message(3, 3, seq=3)]
    for m in batch:
        m.encoded_front()
    out: list[object] = []
    assert A.encode_batch(batch, 0, True, out) == 3
    assert len(out) == 3 and out[1] is big  # [frame 1 + head 2] [data 2] [epilogue 2 + frame 3]
    batch.insert(1, Message(9, "mid", middle=b"m", seq=9))
    assert A.encode_batch(batch, 0, True, []) == 1  # stops where Python must take over
    assert A.encode_batch(batch, 2, True, []) == 4


def test_decoded_messages_are_whole_messages() -> None:
    """The compiled batch fills a Message's slots directly (what its __init__ does): every
    field is readable, the front cache is empty, and re-encoding gives the same frame."""
    assert A is not None
    sent = [Message(5, {"k": [1, 2]}, b"x" * 10, priority=200, tid=7, flags=3, seq=9,
                    ack_seq=4, version=2, compat_version=1)]
    stream = batch_stream(sent)
    msgs, _, _ = A.decode_messages(memoryview(bytearray(stream)), 0, len(stream),
                                   LIMITS.segment_max, LIMITS.data_max, 1 << 20, True, 8)
    (m,) = msgs
    assert type(m) is Message and m._front is None
    assert _fields(m) == _fields(sent[0]) and repr(m).startswith("Message(type=5")
    assert batch_stream(msgs) == stream


def test_decode_messages_calls_a_class_it_cannot_fill() -> None:
    """A message class that is not exactly the slots dataclass (here: a __post_init__) is
    called, not filled: whatever its __init__ does still happens."""
    assert A is not None
    import dataclasses

    import msgpack

    from protocol import message

    @dataclasses.dataclass(slots=True, eq=False)
    class Checked(Message):
        def __post_init__(self) -> None:
            self.tid += 1000

    stream = batch_stream([Message(1, "a", seq=1, tid=1)])
    mv = memoryview(bytearray(stream))
    try:
        A.setup_decode(Checked, msgpack.unpackb, message._MSGPACK_ERRORS)
        (m,), _, _ = A.decode_messages(mv, 0, len(stream), 4096, 4096, 4096, True, 8)
        assert type(m) is Checked and m.tid == 1001
    finally:
        A.setup_decode(Message, msgpack.unpackb, message._MSGPACK_ERRORS)
    (m,), _, _ = A.decode_messages(mv, 0, len(stream), 4096, 4096, 4096, True, 8)
    assert type(m) is Message and m.tid == 1


ints = st.integers(-1, 1 << 16) | st.sampled_from([True, 1 << 64, -(1 << 63), 0x7FFF, 0x8000])
odd = st.sampled_from([1.5, "7", None])


@given(st.builds(
    lambda raw, t, front, fields: Message(t, front, raw=raw, **fields), st.booleans(),
    ints | odd, st.none() | st.integers() | st.text(max_size=5) | st.binary(max_size=5)
    | st.sampled_from([bytearray(b"ba"), memoryview(b"mv"), {1, 2}, object()]),
    st.fixed_dictionaries({k: ints | odd for k in ("tid", "priority", "version", "flags",
                                                   "compat_version")})), st.booleans())
@settings(max_examples=examples(400), deadline=None)
def test_compiled_check_outgoing_agrees_with_check_outgoing_python(msg: Message, ceph_peer: bool) -> None:
    """Passed by both (the same front cached), or refused by both with the same error."""
    import copy

    from protocol.message import check_outgoing, check_outgoing_python

    assert A is not None and check_outgoing is A.check_outgoing
    outcomes = []
    for check, m in ((check_outgoing, msg), (check_outgoing_python, copy.copy(msg))):
        try:
            check(m, ceph_peer)
            outcomes.append(("ok", m.encoded_front()))
        except LocalProtocolError as err:
            outcomes.append(("error", err.code, err.reason))
    assert outcomes[0] == outcomes[1]


def test_compiled_check_outgoing_takes_its_arguments_as_the_python_one_does() -> None:
    assert A is not None
    A.check_outgoing(Message(1, "x"))
    A.check_outgoing(Message(1, b"x", raw=True), True)
    with pytest.raises(LocalProtocolError, match="Ceph daemon"):
        A.check_outgoing(Message(1, "x"), ceph_peer=True)
    for bad in ((), (Message(1), False, 1)):
        with pytest.raises(TypeError):
            A.check_outgoing(*bad)
    with pytest.raises(TypeError):
        A.check_outgoing(Message(1), peer=True)  # type: ignore[call-arg]


def test_new_buffer_is_receive_memory_of_the_size_asked() -> None:
    assert A is not None
    from protocol import frame_decoder

    assert frame_decoder._new_buffer is A.new_buffer
    b = A.new_buffer(1000)
    assert type(b) is bytearray and len(b) == 1000
    memoryview(b)[10:20] = b"x" * 10  # writable like any chunk
    assert b[10:20] == b"x" * 10 and A.new_buffer(0) == bytearray()
    with pytest.raises(ValueError):
        A.new_buffer(-1)
