"""The receive batch (issue 16): ``decode_messages`` decodes a buffer's MESSAGE frames in
one call, and ``Exchange.received_messages`` hands them out, consuming each frame only as
its message is taken.

Runs on whichever path is active (CI runs this directory on both); the compiled path is
also held to the pure one byte for byte in ``test_accel.py``. The reference here is the
general decoder: ``next_frame`` plus ``decode_message``, one frame at a time.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.connection import NEED_DATA, MessageReceived
from protocol.errors import RemoteProtocolError
from protocol.frames import FrameDecoder, FrameLimits, Tag, encode_banner, frame_bytes
from protocol.message import (
    HEADER, MAX_FRONT, Message, decode_message, decode_messages, encode_messages,
    message_segments,
)
from tests.fuzzing import examples
from tests.protocol.test_connection import Pair

LIMITS = FrameLimits(segment_max=1 << 16, data_max=1 << 20)

fronts = st.none() | st.integers(-5, 1 << 40) | st.text(max_size=20) | st.lists(
    st.integers(0, 9), max_size=5) | st.dictionaries(st.text(max_size=3), st.booleans(),
                                                     max_size=3)
messages = st.builds(
    lambda t, front, data, raw, seq, ack: (
        Message(t, str(front).encode(), data, raw=True, seq=seq, ack_seq=ack) if raw
        else Message(t, front, data, seq=seq, ack_seq=ack)),
    st.integers(0, 0x7FFF), fronts, st.sampled_from([0, 1, 100, 5000]).map(bytes),
    st.booleans(), st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))


def _stream(msgs: list[Message]) -> bytes:
    out: list[Any] = []
    encode_messages(msgs, True, out)
    return b"".join(bytes(b) for b in out)


def _fields(m: Message) -> tuple[Any, ...]:
    return (m.type, m.front, bytes(m.data), m.priority, m.tid, m.flags, m.seq, m.ack_seq,
            m.raw, bytes(m.middle), m.version, m.compat_version)


def _decoder(stream: bytes, chunk: int = 256 * 1024) -> FrameDecoder:
    dec = FrameDecoder(LIMITS, chunk_size=chunk)
    dec.feed(encode_banner(0, 0) + stream)
    assert dec.next_banner() is not None
    return dec


def _batch(stream: bytes, limit: int = 1 << 20) -> tuple[list[tuple[Any, ...]], list[int], int]:
    dec = _decoder(stream)
    span = dec.message_span()
    assert span is not None
    mv, start, end, smax, dmax = span
    msgs, ends, ack = decode_messages(mv, start, end, smax, dmax, MAX_FRONT, True, limit)
    return [_fields(m) for m in msgs], [e - start for e in ends], ack


def _reference(stream: bytes, limit: int = 1 << 20) -> tuple[list[tuple[Any, ...]], list[int], int]:
    """One frame at a time, stopping where the batch must stop: the first frame that is
    incomplete, not a plain MESSAGE frame, or refused by decode_message."""
    dec = _decoder(stream)
    got: list[tuple[Any, ...]] = []
    ends: list[int] = []
    total = dec.buffered
    while len(got) < limit:
        segs = dec.next_message()
        if segs is None:
            break
        try:
            msg = decode_message(segs, MAX_FRONT, True)
        except RemoteProtocolError:
            break
        got.append(_fields(msg))
        ends.append(total - dec.buffered)
    return got, ends, max((g[7] for g in got), default=0)


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(messages, max_size=8), st.integers(1, 9))
def test_batch_matches_one_frame_at_a_time(msgs: list[Message], limit: int) -> None:
    stream = _stream(msgs)
    want = _reference(stream, limit)
    assert _batch(stream, limit) == want
    assert len(want[0]) == min(len(msgs), limit)
    for cut in range(0, len(stream), max(1, len(stream) // 25)):  # truncations
        assert _batch(stream[:cut]) == _reference(stream[:cut])


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_batch_matches_after_any_bit_flip(msgs: list[Message], data: st.DataObject) -> None:
    stream = bytearray(_stream(msgs))
    for _ in range(8):
        bit = data.draw(st.integers(0, len(stream) * 8 - 1))
        stream[bit // 8] ^= 1 << (bit % 8)
        assert _batch(bytes(stream)) == _reference(bytes(stream)), bit
        stream[bit // 8] ^= 1 << (bit % 8)


def _header(seq: int, pad: int = 0, t: int = 0x8001) -> bytes:
    return HEADER.pack(seq, 0, t, 127, 1, pad, 0, 0, 0, 1, 0)


@pytest.mark.parametrize("bad, code", [
    (frame_bytes(Tag.MESSAGE, [_header(3, pad=1), b"\xc0"]), "bad_header"),
    (frame_bytes(Tag.MESSAGE, [_header(3)[:40], b"\xc0"]), "bad_header"),
    (frame_bytes(Tag.MESSAGE, [_header(3), b"\xc1"]), "bad_msgpack"),  # 0xc1: never used
    (frame_bytes(Tag.MESSAGE, [_header(3), b"\x92\x01"]), "bad_msgpack"),  # truncated
    (frame_bytes(Tag.MESSAGE, [_header(3), b"\xc0\xc0"]), "bad_msgpack"),  # extra data
])
def test_batch_stops_before_a_refused_frame_and_the_general_path_words_it(
        bad: bytes, code: str) -> None:
    good = _stream([Message(1, "a", seq=1), Message(2, "b", seq=2)])
    stream = good + bad + _stream([Message(3, "c", seq=4)])
    got, ends, _ = _batch(stream)
    assert [g[1] for g in got] == ["a", "b"] and ends[-1] == len(good)
    dec = _decoder(stream)
    assert dec.message_span() is not None
    for _ in range(2):
        frame = dec.next_frame()
        assert frame is not None
        decode_message(frame.segments)
    frame = dec.next_frame()
    assert frame is not None
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(frame.segments)
    assert info.value.code == code


def test_oversized_front_is_left_to_the_general_path() -> None:
    dec = _decoder(_stream([Message(1, "x" * 100, seq=1)]))
    span = dec.message_span()
    assert span is not None
    mv, start, end, smax, dmax = span
    assert decode_messages(mv, start, end, smax, dmax, 50, True, 10) == ([], [], 0)
    assert len(decode_messages(mv, start, end, smax, dmax, 120, True, 10)[0]) == 1


# -- Exchange.received_messages ---------------------------------------------------------------

def _ready_pair() -> Pair:
    pair = Pair()
    pair.connect()
    assert pair.client.is_ready and pair.server.is_ready
    return pair


def _send(pair: Pair, fronts: list[Any]) -> None:
    for f in fronts:
        pair.client_session.queue(Message(1, f))
    pair.client.write_messages()
    pair.server.receive_data(b"".join(bytes(b) for b in pair.client.data_to_send()))


def _drain(conn: Any) -> list[Any]:
    """What AsyncConnection._process does: the batch first, next_event for the rest."""
    got = []
    while True:
        got += [m.front for m in conn.received_messages()]
        ev = conn.next_event()
        if ev is NEED_DATA:
            return got
        if isinstance(ev, MessageReceived):
            got.append(ev.message.front)


def test_a_consumer_that_stops_early_leaves_the_rest_in_the_stream() -> None:
    pair = _ready_pair()
    _send(pair, list(range(10)))
    server, session = pair.server, pair.server.session
    assert session is not None
    taken = []
    for front in (m.front for m in server.received_messages()):
        taken.append(front)
        if len(taken) == 3:
            break  # e.g. throttled: frames 4..10 are neither consumed nor counted
    assert taken == [0, 1, 2] and session.in_seq == 3 and server.messages_in == 3
    assert _drain(server) == list(range(3, 10))
    assert session.in_seq == 10 and server.messages_in == 10 and session.ack_pending == 10


def test_a_stale_batch_stops_instead_of_handing_a_message_out_twice() -> None:
    pair = _ready_pair()
    _send(pair, ["a", "b", "c", "d"])
    server = pair.server
    batch = server.received_messages()
    assert next(batch).front == "a"
    ev = server.next_event()  # someone else consumes "b" in between
    assert isinstance(ev, MessageReceived) and ev.message.front == "b"
    assert list(batch) == []  # the batch notices the stream moved and stops
    assert _drain(server) == ["c", "d"] and server.messages_in == 4


def test_duplicates_are_dropped_and_counted_once() -> None:
    pair = _ready_pair()
    server, session = pair.server, pair.server.session
    assert session is not None
    frames = b"".join(frame_bytes(Tag.MESSAGE, message_segments(Message(1, seq), seq, 0))
                      for seq in (1, 2, 2, 3, 1, 4))
    server.receive_data(frames)
    assert [m.front for m in server.received_messages()] == [1, 2, 3, 4]
    assert session.duplicates_dropped == 2 and session.in_seq == 4
    assert _drain(server) == []


def test_a_control_frame_ahead_keeps_its_place_in_the_order() -> None:
    pair = _ready_pair()
    server = pair.server
    pair.client.send_keepalive((1, 2))
    _send(pair, ["after the keepalive"])
    assert list(server.received_messages()) == []  # the keepalive frame comes first
    ev = server.next_event()
    assert type(ev).__name__ == "KeepaliveReceived"
    assert [m.front for m in server.received_messages()] == ["after the keepalive"]


def test_advance_refuses_a_span_of_another_chunk() -> None:
    """A batch is stale once its chunk was retired, even where the offsets still match."""
    one = _stream([Message(1, "a", seq=1)])
    dec = _decoder(one)
    span = dec.message_span()
    assert span is not None
    mv, start, _, _, _ = span
    retired = memoryview(bytearray(len(mv)))  # same size, same offsets, another chunk
    assert not dec.advance(retired, start, start + len(one))
    assert not dec.advance(mv, start + 1, start + len(one))  # the stream moved
    assert dec.advance(mv, start, start + len(one)) and dec.buffered == 0
