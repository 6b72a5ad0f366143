"""msgr2.1 crc-mode framing: vectors, round trips, truncation, corruption, caps, zero copy.

The reference encoder and the bitwise CRC-32C below are written independently of
protocol/ so the vectors check the wire format, not the implementation against itself.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples

from protocol.crc import crc32c
from protocol.errors import FrameError, LocalProtocolError, RemoteProtocolError
from protocol.frames import (
    BANNER_PREFIX,
    EPILOGUE_SIZE,
    PREAMBLE_SIZE,
    Banner,
    Frame,
    FrameDecoder,
    FrameLimits,
    Tag,
    encode_banner,
    encode_frame,
    frame_bytes,
)

FUZZ = settings(max_examples=examples(150), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# -- independent reference implementation ----------------------------------------------

def ref_crc(data: bytes, seed: int) -> int:
    """Bitwise raw CRC-32C (reflected Castagnoli polynomial), no inversion."""
    crc = seed
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


def ref_frame(tag: int, segs: Sequence[bytes], flags: int = 0, late: int = 0x0E,
              nseg: int | None = None, lens: Sequence[int] | None = None,
              absent_crc: int = 0) -> bytes:
    """Build a rev1 crc frame by hand; overrides let tests build illegal frames."""
    segs = list(segs)
    n = len(segs) if nseg is None else nseg
    lengths = list(lens) if lens is not None else [len(s) for s in segs] + [0] * (4 - len(segs))
    aligns = [8 if i < len(segs) else 0 for i in range(4)]
    if tag == Tag.MESSAGE and len(segs) > 3:
        aligns[3] = 4096
    body = struct.pack("<BB", tag, n)
    for ln, al in zip(lengths, aligns):
        body += struct.pack("<IH", ln, al)
    body += struct.pack("<BB", flags, 0)
    out = body + struct.pack("<I", ref_crc(body, 0))
    if segs[0]:
        out += segs[0] + struct.pack("<I", ref_crc(segs[0], 0xFFFFFFFF))
    if len(segs) > 1:
        out += b"".join(segs[1:])
        crcs = [ref_crc(s, 0xFFFFFFFF) for s in segs[1:]] + [absent_crc] * (4 - len(segs))
        out += struct.pack("<BIII", late, *crcs)
    return out


def drain(dec: FrameDecoder) -> list[Frame]:
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(f)
    return out


def as_tuple(f: Frame) -> tuple[int, list[bytes], int]:
    return f.tag, [bytes(s) for s in f.segments], f.flags


def trimmed(segs: Sequence[bytes]) -> list[bytes]:
    segs = list(segs)
    while len(segs) > 1 and not segs[-1]:
        segs.pop()
    return segs


# -- CRC ---------------------------------------------------------------------------------

def test_crc_known_vector() -> None:
    # The standard CRC-32C check value of "123456789" is 0xE3069283 (finalised form);
    # the raw form with seed ~0 is its complement.
    assert crc32c(b"123456789", 0xFFFFFFFF) == 0xE3069283 ^ 0xFFFFFFFF
    assert crc32c(b"", 0) == 0 and crc32c(b"", 0xFFFFFFFF) == 0xFFFFFFFF


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([0, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1))
def test_crc_matches_bitwise_reference(data: bytes, seed: int) -> None:
    assert crc32c(data, seed) == ref_crc(data, seed)
    assert crc32c(memoryview(bytearray(data)), seed) == ref_crc(data, seed)


# -- vectors -----------------------------------------------------------------------------

VECTORS = [
    # ACK{seq=1}: one segment, inline seg0 crc, no epilogue.
    (Tag.ACK, [bytes.fromhex("0100000000000000")], 0,
     ("1401" "08000000" "0800" "00000000" "0000" "00000000" "0000" "00000000" "0000" "00" "00"
      "7374bc5b" "0100000000000000" "5230eb3a")),
    # MESSAGE with data and an empty middle (4 segments, as a ceph-mon sends MMonCommandAck:
    # tests/ceph/vectors.py): data at index 3 aligned 4096, the empty middle present with
    # align 8 and crc 0xffffffff (raw crc32c(-1) of nothing), late_status 0x0e.
    (Tag.MESSAGE, [b"HHHH", b"front", b"", b"DATA!"], 0,
     ("1104" "04000000" "0800" "05000000" "0800" "00000000" "0800" "05000000" "0010" "00" "00"
      "b1b9ddba" "48484848" "ea76efbc" "66726f6e74" "4441544121"
      "0e" "f4bb5684" "ffffffff" "6ca2000c")),
    # WAIT: one empty segment, so neither a seg0 crc nor an epilogue: just the preamble.
    (Tag.WAIT, [b""], 0,
     "1001" "00000000" "0800" + "00" * 20 + "c8e3aab0"),
]


@pytest.mark.parametrize("tag,segs,flags,hexwire", VECTORS, ids=["ack", "message4", "wait"])
def test_vectors(tag: Tag, segs: list[bytes], flags: int, hexwire: str) -> None:
    wire = bytes.fromhex(hexwire)
    assert ref_frame(tag, segs, flags) == wire  # the hand-written bytes are right
    assert frame_bytes(tag, segs, flags) == wire
    dec = FrameDecoder()
    dec.feed(wire)
    (frame,) = drain(dec)
    assert as_tuple(frame) == (tag, segs, flags)
    assert dec.buffered == 0


def test_layout_sizes() -> None:
    assert PREAMBLE_SIZE == 32 and EPILOGUE_SIZE == 13
    wire = frame_bytes(Tag.MESSAGE, [b"a" * 10, b"b" * 20, b"c" * 30])
    assert len(wire) == 32 + 10 + 4 + 20 + 30 + 13


def test_encode_frame_does_not_copy_segments() -> None:
    s0, s1 = bytearray(b"x" * 100), memoryview(b"y" * 1000)
    bufs = encode_frame(Tag.MESSAGE, [s0, b"", s1])
    assert bufs[1] is s0 and bufs[3] is s1  # preamble, s0, crc0, s1, epilogue
    assert len(bufs) == 5 and b"".join(bufs) == ref_frame(Tag.MESSAGE, [bytes(s0), b"", bytes(s1)])


def test_encode_trims_trailing_empty_segments() -> None:
    wire = frame_bytes(Tag.MESSAGE, [b"h", b"f", b"", b""])
    assert wire[1] == 2 and wire == ref_frame(Tag.MESSAGE, [b"h", b"f"])
    assert frame_bytes(Tag.WAIT, [b"", b""]) == ref_frame(Tag.WAIT, [b""])


@pytest.mark.parametrize("segs", [[], [b"a"] * 5, [b"a", b"", b"", b"", b"b"]])
def test_encode_segment_count_checked(segs: list[bytes]) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(Tag.MESSAGE, segs)


@pytest.mark.parametrize("tag,flags", [(0, 0), (21, 0), (256, 0), (-1, 0), (Tag.ACK, 256)])
def test_encode_rejects_bad_tag_or_flags(tag: int, flags: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(tag, [b"x"], flags)


# -- banner ------------------------------------------------------------------------------

def test_banner_round_trip_and_every_prefix_waits() -> None:
    wire = encode_banner(0x3, 0x1)
    assert wire == BANNER_PREFIX + b"\x10\x00" + struct.pack("<QQ", 3, 1)
    for cut in range(len(wire)):
        dec = FrameDecoder()
        dec.feed(wire[:cut])
        assert dec.next_banner() is None
    dec = FrameDecoder()
    dec.feed(wire + frame_bytes(Tag.ACK, [bytes(8)]))
    assert dec.next_banner() == Banner(3, 1)
    assert as_tuple(drain(dec)[0]) == (Tag.ACK, [bytes(8)], 0)
    with pytest.raises(LocalProtocolError):
        dec.next_banner()


@pytest.mark.parametrize("wire", [b"ceph v027", b"ceph v027\x00" * 4, b"ceph v0"])
def test_msgr1_banner_detected(wire: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(wire)
    with pytest.raises(RemoteProtocolError, match="msgr1") as info:
        dec.next_banner()
    assert info.value.code == "msgr1"


@pytest.mark.parametrize("wire", [b"G", b"GET / HTTP/1.1\r\n", b"ceph v3\n", b"\x00" * 40,
                                  BANNER_PREFIX + b"\x11\x00" + bytes(17),
                                  BANNER_PREFIX + b"\x00\x00"])
def test_bad_banner_rejected(wire: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(wire)
    with pytest.raises(RemoteProtocolError) as info:
        dec.next_banner()
    assert info.value.code == "bad_banner" and info.value.reason


# -- round trips over arbitrary splits ----------------------------------------------------

segment = st.binary(max_size=40) | st.binary(min_size=100, max_size=3000)
# Only MESSAGE frames may carry more than one segment.
frame_st = st.one_of(
    st.tuples(st.just(Tag.MESSAGE), st.lists(segment, min_size=1, max_size=4), st.integers(0, 255)),
    st.tuples(st.sampled_from([t for t in Tag if t != Tag.MESSAGE]),
              st.lists(segment, min_size=1, max_size=1), st.integers(0, 255)),
)


def _socket_feed(dec: FrameDecoder, data: bytes) -> list[object]:
    """Deliver ``data`` like recv_into would (bounded by the lent view); return the
    ``obj`` of every view that was written so tests can check where frames live."""
    pos = 0
    owners: list[object] = []
    while pos < len(data):
        view = dec.get_buffer()
        assert len(view) >= 1 and not view.readonly
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos:pos + n]
        dec.buffer_updated(n)
        owners.append(view.obj)
        pos += n
    return owners


@FUZZ
@given(st.lists(frame_st, min_size=1, max_size=6), st.lists(st.integers(1, 5000), max_size=30),
       st.sampled_from([64, 100, 1024, 256 * 1024]), st.booleans(), st.booleans())
def test_round_trip_any_split(frames: list[tuple[Tag, list[bytes], int]], cuts: list[int],
                              chunk: int, socket_style: bool, banner: bool) -> None:
    wire = b"".join(frame_bytes(t, s, f) for t, s, f in frames)
    if banner:
        wire = encode_banner(1, 0) + wire
    expected = [(t, trimmed(s), f) for t, s, f in frames]
    dec = FrameDecoder(chunk_size=chunk)
    got: list[Frame] = []
    pos = 0
    got_banner = not banner
    for cut in cuts + [len(wire)]:
        piece = wire[pos:pos + cut]
        pos += len(piece)
        if socket_style:
            _socket_feed(dec, piece)
        else:
            dec.feed(piece)
        if not got_banner:
            b = dec.next_banner()
            if b is None:
                continue
            assert b == Banner(1, 0)
            got_banner = True
        got += drain(dec)
        if pos >= len(wire):
            break
    # Compared only now: frames handed out early must not have been overwritten since.
    assert [as_tuple(f) for f in got] == expected
    assert dec.buffered == 0 and dec.aborted_frames == 0


# -- truncation and corruption -----------------------------------------------------------

SAMPLES = [
    (Tag.ACK, [bytes(range(8))]),
    (Tag.WAIT, [b""]),
    (Tag.MESSAGE, [b"h" * 41, b"\x81\xa1k\x01", b"", b"payload"]),
    (Tag.MESSAGE, [b"h" * 41, b"", b"", b"d" * 9]),
    (Tag.MESSAGE, [b"h" * 41, b"\x81\xa1k\x01"]),
    (Tag.MESSAGE, [b"", b"a", b"b", b"c"]),
    (Tag.HELLO, [b"x" * 20]),
]


@pytest.mark.parametrize("tag,segs", SAMPLES)
def test_every_truncation_waits(tag: Tag, segs: list[bytes]) -> None:
    wire = frame_bytes(tag, segs)
    for cut in range(len(wire)):
        for chunk in (64, 4096):
            dec = FrameDecoder(chunk_size=chunk)
            dec.feed(wire[:cut])
            assert dec.next_frame() is None
            assert dec.buffered == cut


@pytest.mark.parametrize("tag,segs", SAMPLES)
def test_every_bit_flip_is_rejected(tag: Tag, segs: list[bytes]) -> None:
    wire = frame_bytes(tag, segs)
    for bit in range(len(wire) * 8):
        bad = bytearray(wire)
        bad[bit // 8] ^= 1 << (bit % 8)
        dec = FrameDecoder()
        dec.feed(bad)
        try:
            got = dec.next_frame()
        except FrameError:
            continue
        # Only a flip that makes the frame look longer may wait; it must never decode.
        assert got is None, f"bit {bit} decoded as {as_tuple(got)}"


@FUZZ
@given(st.binary(min_size=1, max_size=400))
def test_random_bytes_never_crash(data: bytes) -> None:
    dec = FrameDecoder(chunk_size=64)
    try:
        dec.feed(data)
        drain(dec)
    except FrameError:
        pass


def test_corrupt_frame_error_is_sticky() -> None:
    bad = bytearray(frame_bytes(Tag.MESSAGE, [b"h", b"f", b"d"]))
    bad[-1] ^= 0xFF
    dec = FrameDecoder()
    dec.feed(bad)
    for _ in range(2):
        with pytest.raises(FrameError) as info:
            dec.next_frame()
        assert info.value.code == "bad_crc"


@pytest.mark.parametrize("wire,code", [
    (ref_frame(99, [b"x"]), "bad_tag"),
    (ref_frame(0, [b"x"]), "bad_tag"),
    (ref_frame(Tag.ACK, [b"x"], nseg=0), "bad_segments"),
    (ref_frame(Tag.ACK, [b"x"], nseg=5), "bad_segments"),
    (ref_frame(Tag.MESSAGE, [b"x", b""]), "bad_segments"),  # empty last segment
    (ref_frame(Tag.ACK, [b"x"], lens=[1, 0, 7, 0]), "bad_segments"),  # length past nseg
    (ref_frame(Tag.HELLO, [b"x", b"y"]), "bad_segments"),  # control frames have one segment
    (ref_frame(Tag.MESSAGE, [b"x", b"y"], late=0x0F), "bad_late_status"),
    (ref_frame(Tag.MESSAGE, [b"x", b"y"], late=0x1E), "bad_late_status"),  # reserved nibble
    (ref_frame(Tag.MESSAGE, [b"x", b"y"], absent_crc=1), "bad_crc"),
    (ref_frame(Tag.ACK, [b"x" * 100]), "oversize"),  # control_max=64 in this test
    (ref_frame(Tag.MESSAGE, [b"x" * 65, b"y"]), "oversize"),  # segment_max=64
    (ref_frame(Tag.MESSAGE, [b"x", b"y", b"z" * 65]), "oversize"),  # middle: segment_max
    (ref_frame(Tag.MESSAGE, [b"x", b"y", b"", b"z" * 129]), "oversize"),  # data_max=128
])
def test_structural_errors(wire: bytes, code: str) -> None:
    dec = FrameDecoder(FrameLimits(control_max=64, segment_max=64, data_max=128))
    dec.feed(wire)
    with pytest.raises(FrameError) as info:
        dec.next_frame()
    assert info.value.code == code and info.value.reason


def test_limits_edges_accepted() -> None:
    dec = FrameDecoder(FrameLimits(control_max=64, segment_max=64, data_max=128))
    dec.feed(ref_frame(Tag.AUTH_REQUEST, [b"x" * 64]))
    dec.feed(ref_frame(Tag.MESSAGE, [b"x" * 64, b"y" * 64, b"w" * 64, b"z" * 128]))
    assert [f.tag for f in drain(dec)] == [Tag.AUTH_REQUEST, Tag.MESSAGE]


@pytest.mark.parametrize("kwargs", [{"control_max": 0}, {"segment_max": -1},
                                    {"data_max": 64 * 1024 * 1024 + 1},
                                    {"control_max": 64 * 1024 + 1}, {"data_max": True}])
def test_limits_validated(kwargs: dict[str, int]) -> None:
    with pytest.raises(LocalProtocolError):
        FrameLimits(**kwargs)


def test_aborted_frame_skipped() -> None:
    dec = FrameDecoder()
    aborted = ref_frame(Tag.MESSAGE, [b"h", b"half-written"], late=0x01)
    ok = ref_frame(Tag.ACK, [bytes(8)])
    dec.feed(aborted + ok)
    assert [as_tuple(f) for f in drain(dec)] == [(Tag.ACK, [bytes(8)], 0)]
    assert dec.aborted_frames == 1 and dec.buffered == 0


# -- memory: caps before allocation, zero copy -----------------------------------------------

@pytest.mark.parametrize("tag,lens", [(Tag.MESSAGE, [32, 0, 60 << 20, 0]),
                                      (Tag.MESSAGE, [60 << 20, 1, 0, 0]),
                                      (Tag.AUTH_REQUEST, [60 << 20, 0, 0, 0])])
def test_caps_checked_before_allocation(tag: Tag, lens: list[int]) -> None:
    nseg = max(i + 1 for i, n in enumerate(lens) if n)
    preamble = ref_frame(tag, [b"x"] * nseg, nseg=nseg, lens=lens)[:PREAMBLE_SIZE]
    dec = FrameDecoder(FrameLimits(segment_max=1 << 20, data_max=1 << 20), chunk_size=4096)
    tracemalloc.start()
    try:
        _socket_feed(dec, preamble + b"\x00" * 100)
        dec.get_buffer()  # must not allocate the announced body either
        with pytest.raises(FrameError) as info:
            dec.next_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == "oversize"
    assert peak < 256 * 1024, f"peak {peak} bytes: body allocated before the cap check"


def test_large_frame_gets_one_exact_buffer_filled_by_the_socket() -> None:
    data = bytes(range(256)) * 400  # 102400 bytes, far bigger than the chunk
    wire = frame_bytes(Tag.MESSAGE, [b"H" * 41, b"front", b"", data])
    dec = FrameDecoder(chunk_size=4096)
    frames: list[Frame] = []
    owners: list[object] = []
    for pos in range(0, len(wire), 1500):  # MTU-sized recvs
        owners += _socket_feed(dec, wire[pos:pos + 1500])
        frames += drain(dec)
    (frame,) = frames
    seg = frame.segments[3]
    assert bytes(seg) == data
    # The data segment is a view into the buffer the socket filled last, sized exactly
    # to the frame: the payload was written once by "recv" and never moved afterwards.
    assert seg.obj is owners[-1]
    assert isinstance(seg.obj, bytearray) and len(seg.obj) == len(wire)
    assert sum(1 for o in owners if o is seg.obj) >= len(data) // 1500 - 1


def test_small_frames_are_views_into_the_chunk() -> None:
    wire = frame_bytes(Tag.MESSAGE, [b"H" * 32, b"f", b"d" * 50]) * 3
    dec = FrameDecoder()
    owners = _socket_feed(dec, wire)
    frames = drain(dec)
    assert len(frames) == 3
    for f in frames:
        assert all(s.obj is owners[0] for s in f.segments)


def test_rotation_never_overwrites_handed_out_frames() -> None:
    one = frame_bytes(Tag.MESSAGE, [b"H" * 32, b"f" * 7, b"d" * 30])
    dec = FrameDecoder(chunk_size=256)
    kept: list[Frame] = []
    for i in range(50):
        _socket_feed(dec, one[:i % len(one)])
        kept += drain(dec)
        _socket_feed(dec, one[i % len(one):])
        kept += drain(dec)
    assert len(kept) == 50
    assert all(bytes(f.segments[2]) == b"d" * 30 for f in kept)


def test_buffer_updated_checks_bounds() -> None:
    dec = FrameDecoder(chunk_size=64)
    view = dec.get_buffer()
    with pytest.raises(LocalProtocolError):
        dec.buffer_updated(len(view) + 1)
    with pytest.raises(LocalProtocolError):
        dec.buffer_updated(-1)
    with pytest.raises(LocalProtocolError):
        FrameDecoder(chunk_size=8)


def test_take_pending_hands_over_the_stream() -> None:
    f1 = frame_bytes(Tag.ACK, [bytes(8)])
    f2 = frame_bytes(Tag.MESSAGE, [b"H" * 32, b"f", b"d" * 5000])
    wire = encode_banner(1, 0) + f1 + f2
    cut = len(wire) - 1000
    dec = FrameDecoder(chunk_size=1024)
    _socket_feed(dec, wire[:cut])
    assert dec.next_banner() == Banner(1, 0)
    assert [f.tag for f in drain(dec)] == [Tag.ACK]
    pending = dec.take_pending()
    assert pending == wire[len(wire) - len(f2):cut]
    assert dec.buffered == 0 and dec.next_frame() is None
    other = FrameDecoder()
    other.feed(pending + wire[cut:])
    assert [as_tuple(f) for f in drain(other)] == [(Tag.MESSAGE, [b"H" * 32, b"f", b"d" * 5000], 0)]


@FUZZ
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=40), st.integers(1, 5000))
def test_partial_frames_move_at_most_once(sizes: list[int], recv: int) -> None:
    """Moving leftovers to a fresh chunk only ever moves part of one frame, and a frame
    that was moved completes in its new chunk (so the bytes moved never exceed the
    stream: no frame is copied twice)."""
    frames = [frame_bytes(Tag.MESSAGE, [b"H" * 32, b"f", b"d" * (n + 1)]) for n in sizes]
    wire = b"".join(frames)
    moved: list[int] = []
    original = FrameDecoder._rotate

    def spy(self: FrameDecoder, size: int) -> None:
        moved.append(self.buffered)
        original(self, size)

    FrameDecoder._rotate = spy  # type: ignore[method-assign]
    try:
        dec = FrameDecoder(chunk_size=4096)
        got: list[Frame] = []
        pos = 0
        while pos < len(wire):  # a transport: recv_into, buffer_updated, drain
            view = dec.get_buffer()
            n = min(len(view), recv, len(wire) - pos)
            view[:n] = wire[pos:pos + n]
            dec.buffer_updated(n)
            pos += n
            got += drain(dec)
    finally:
        FrameDecoder._rotate = original  # type: ignore[method-assign]
    assert [bytes(f.segments[2]) for f in got] == [b"d" * (n + 1) for n in sizes]
    biggest = max(len(f) for f in frames)
    assert all(m < biggest for m in moved)
    assert sum(moved) <= len(wire)
