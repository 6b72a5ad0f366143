"""memif control messages and ring layout (shared/notes/memif.md §3.3, §3.5)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.memif import wire


def test_constants_match_dpdk_22_11() -> None:
    assert wire.MSG_SIZE == 128
    assert wire.VERSION == 0x0200
    assert wire.COOKIE == 0x3E31F20
    assert (wire.RING_HEAD_OFF, wire.RING_TAIL_OFF, wire.RING_DESC_OFF) == (6, 64, 128)
    assert wire.ring_bytes(10) == 128 + 16 * 1024
    assert struct.calcsize("<HHIII") == wire.DESC_SIZE


@pytest.mark.parametrize("msg,size", [
    (wire.Hello(b"srv"), 43),
    (wire.Init(wire.VERSION, 7, 0, b"s3cret", b"cli"), 63),
    (wire.AddRegion(0, 6 << 20), 10),
    (wire.AddRing(1, 0, 0, 0, 10, 0), 13),
    (wire.Connect(b"ifname"), 32),
    (wire.Connected(b"ifname"), 32),
    (wire.Disconnect(1, b"ID not found"), 100),
    (wire.Ack(), 0),
])
def test_round_trip_and_body_sizes(msg: wire.Message, size: int) -> None:
    data = wire.pack(msg)
    assert len(data) == 128
    assert type(msg).FMT.size == size
    assert struct.unpack_from("<H", data)[0] == msg.TYPE
    assert data[2 + size:] == bytes(126 - size)  # the rest is zero
    back = wire.unpack(data)
    assert type(back) is type(msg) and back == msg


def test_hello_layout_is_packed_little_endian() -> None:
    data = wire.pack(wire.Hello(b"x", 0x0200, 0x0200, 255, 254, 253, 14))
    assert data[:2] == b"\x02\x00"
    assert data[2:34] == b"x" + bytes(31)
    assert struct.unpack_from("<HHHHHB", data, 34) == (0x200, 0x200, 255, 254, 253, 14)


def test_add_ring_fields_and_c2s_flag() -> None:
    data = wire.pack(wire.AddRing(wire.RING_FLAG_C2S, 3, 1, 4096, 12, 0))
    assert struct.unpack_from("<HHHIBH", data, 2) == (1, 3, 1, 4096, 12, 0)
    msg = wire.unpack(data)
    assert isinstance(msg, wire.AddRing) and msg.c2s


@pytest.mark.parametrize("size", [0, 127, 129, 256])
def test_wrong_size_rejected(size: int) -> None:
    with pytest.raises(wire.WireError, match="size"):
        wire.unpack(bytes(size))


def test_unknown_type_and_trailing_garbage_rejected() -> None:
    with pytest.raises(wire.WireError, match="unknown"):
        wire.unpack(struct.pack("<H", 99) + bytes(126))
    bad = bytearray(wire.pack(wire.Ack()))
    bad[100] = 1
    with pytest.raises(wire.WireError, match="non-zero"):
        wire.unpack(bytes(bad))


def test_field_ranges_validated() -> None:
    with pytest.raises(wire.WireError, match="log2"):
        wire.unpack(wire.pack(wire.AddRing(0, 0, 0, 0, 15, 0)))
    with pytest.raises(wire.WireError, match="log2"):
        wire.unpack(wire.pack(wire.AddRing(0, 0, 0, 0, 0, 0)))
    with pytest.raises(wire.WireError, match="ring index"):
        wire.unpack(wire.pack(wire.AddRing(0, 255, 0, 0, 10, 0)))
    with pytest.raises(wire.WireError, match="region"):
        wire.unpack(wire.pack(wire.AddRegion(0, 0)))
    with pytest.raises(wire.WireError, match="at most"):
        wire.pack(wire.Init(secret=b"x" * 25))
    with pytest.raises(wire.WireError, match="at most"):
        wire.pack(wire.Connect(b"n" * 33))


def test_strings_are_nul_terminated_fields() -> None:
    msg = wire.unpack(wire.pack(wire.Disconnect(5, b"Incorrect secret")))
    assert msg == wire.Disconnect(5, b"Incorrect secret")
    full = wire.unpack(wire.pack(wire.Connect(b"n" * 32)))  # exactly fills: no NUL
    assert full == wire.Connect(b"n" * 32)


@given(st.binary(min_size=128, max_size=128))
def test_unpack_never_crashes(data: bytes) -> None:
    """Any 128 bytes either parse to a message that re-packs identically or raise WireError."""
    try:
        msg = wire.unpack(data)
    except wire.WireError:
        return
    again = wire.pack(msg)
    assert wire.unpack(again) == msg
