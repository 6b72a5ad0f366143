"""The hot paths must agree with the general ones: the fused MESSAGE encoder produces the
general encoder's bytes, and ``FrameDecoder.next_message`` accepts exactly the MESSAGE
frames ``next_frame`` accepts (and consumes nothing otherwise)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples

from protocol.errors import FrameError
from protocol.frames import (
    FrameDecoder,
    FrameLimits,
    Tag,
    encode_banner,
    encode_frame,
    encode_message_frame,
    frame_bytes,
)
from protocol.message import HEADER
from tests.protocol.test_frames import FUZZ, SAMPLES, frame_st, ref_frame, trimmed


@settings(max_examples=examples(300), deadline=None)
@given(front=st.binary(max_size=300), data=st.binary(max_size=9000),
       seq=st.integers(0, 2**64 - 1), as_view=st.booleans(),
       middle=st.just(b"") | st.binary(max_size=50))
def test_fused_encoder_matches_general(front: bytes, data: bytes, seq: int, as_view: bool,
                                       middle: bytes) -> None:
    header = HEADER.pack(seq, 9, 7, 127, 1, 0, 0, 3, 0, 1, 0)
    payload = memoryview(data) if as_view else data
    fast = b"".join(bytes(b) for b in encode_message_frame(header, front, payload, middle))
    general = b"".join(bytes(b) for b in encode_frame(Tag.MESSAGE,
                                                      [header, front, middle, data]))
    assert fast == general
    dec = FrameDecoder()
    dec.feed(fast)
    frame = dec.next_frame()
    assert frame is not None and frame.tag == Tag.MESSAGE
    assert bytes(frame.segments[0]) == header


def test_large_data_is_not_copied() -> None:
    data = bytearray(100_000)
    bufs = encode_message_frame(HEADER.pack(1, 0, 1, 127, 1, 0, 0, 0, 0, 1, 0), b"\x90", data)
    assert any(b is data for b in bufs)


# -- next_message: the per-message receive fast path -----------------------------------------

def _drain_fast(dec: FrameDecoder) -> list[tuple[int, list[bytes]]]:
    """What the READY state does: the fast path first, next_frame() when it declines."""
    out: list[tuple[int, list[bytes]]] = []
    while True:
        segs = dec.next_message()
        if segs is not None:
            out.append((int(Tag.MESSAGE), [bytes(s) for s in segs]))
            continue
        frame = dec.next_frame()
        if frame is None:
            return out
        out.append((frame.tag, [bytes(s) for s in frame.segments]))


@FUZZ
@given(st.lists(frame_st, min_size=1, max_size=8), st.lists(st.integers(1, 3000), max_size=20),
       st.sampled_from([64, 256, 4096, 256 * 1024]))
def test_next_message_agrees_with_next_frame(frames: list[tuple[Tag, list[bytes], int]],
                                             cuts: list[int], chunk: int) -> None:
    wire = encode_banner(1, 0) + b"".join(frame_bytes(t, s, f) for t, s, f in frames)
    dec = FrameDecoder(chunk_size=chunk)
    got: list[tuple[int, list[bytes]]] = []
    pos = 0
    banner = False
    for cut in cuts + [len(wire)]:
        dec.feed(wire[pos:pos + cut])
        pos += cut
        if not banner:
            banner = dec.next_banner() is not None
            if not banner:
                continue
        got += _drain_fast(dec)
        if pos >= len(wire):
            break
    # Compared at the end: views handed out early must not have been overwritten.
    assert got == [(int(t), trimmed(s)) for t, s, _ in frames]
    assert dec.buffered == 0


@pytest.mark.parametrize("tag,segs", [s for s in SAMPLES if s[0] == Tag.MESSAGE])
def test_next_message_never_takes_a_corrupt_frame(tag: Tag, segs: list[bytes]) -> None:
    wire = frame_bytes(tag, segs)
    for bit in range(len(wire) * 8):
        bad = bytearray(wire)
        bad[bit // 8] ^= 1 << (bit % 8)
        dec = FrameDecoder()
        dec.feed(encode_banner(1, 0))
        assert dec.next_banner() is not None
        dec.feed(bad)
        assert dec.next_message() is None, f"bit {bit} was accepted by the fast path"
        assert dec.buffered == len(bad)  # nothing consumed: next_frame() decides
        try:
            assert dec.next_frame() is None  # only a longer-looking frame may wait
        except FrameError:
            pass


@pytest.mark.parametrize("wire", [
    ref_frame(Tag.MESSAGE, [b"x", b""]),  # empty last segment
    ref_frame(Tag.MESSAGE, [b"x", b"y"], late=0x01),  # aborted: next_frame skips it
    ref_frame(Tag.MESSAGE, [b"x", b"y"], late=0x1E),
    ref_frame(Tag.MESSAGE, [b"x", b"y"], absent_crc=1),
    ref_frame(Tag.MESSAGE, [b"x", b"y", b"z"], absent_crc=1),
    ref_frame(Tag.MESSAGE, [b"x", b"y", b"z", b"w"]),  # four segments: not a message
    ref_frame(Tag.MESSAGE, [b"", b"y"]),  # empty header
    ref_frame(Tag.MESSAGE, [b"x" * 65, b"y"]),  # segment_max=64
    ref_frame(Tag.MESSAGE, [b"x", b"y" * 65]),
    ref_frame(Tag.MESSAGE, [b"x", b"y", b"", b"z" * 129]),  # data_max=128
    ref_frame(Tag.ACK, [b"x" * 8]),
], ids=["empty-last", "aborted", "reserved-late", "absent-crc-2", "absent-crc-3", "middle",
        "empty-header", "big-header", "big-front", "big-data", "control"])
def test_next_message_declines_what_it_does_not_own(wire: bytes) -> None:
    dec = FrameDecoder(FrameLimits(segment_max=64, data_max=128))
    dec.feed(encode_banner(1, 0))
    assert dec.next_banner() is not None
    dec.feed(wire)
    assert dec.next_message() is None
    assert dec.buffered == len(wire)


def test_next_message_waits_for_the_banner() -> None:
    dec = FrameDecoder()
    dec.feed(frame_bytes(Tag.MESSAGE, [b"h" * 32]))
    assert dec.next_message() is None  # a banner may still come: next_frame() decides
    assert dec.next_frame() is not None
