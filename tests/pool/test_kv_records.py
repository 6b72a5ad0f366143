"""The kv ring records: every request and reply shape round-trips, junk is refused with
ValueError (records cross processes), and the value is never msgpack on the ring."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pool.apps.kv.records import (
    MIG_TAG,
    OP_TAG,
    decode_migration,
    decode_op,
    decode_reply,
    encode_migration,
    encode_op,
    encode_reply,
)


@given(st.sampled_from(["put", "get", "del"]), st.text(max_size=40), st.binary(max_size=300),
       st.integers(0, 2**64 - 1), st.integers(0, 255))
def test_op_round_trip(op: str, key: str, val: bytes, version: int, hops: int) -> None:
    rec = encode_op(op, key, val, version, hops)
    assert rec[0] == OP_TAG
    assert decode_op(rec) == (op, key, val if op == "put" else None, version, hops)
    if op == "put":
        assert rec.endswith(val)  # raw, behind the header


REPLIES: list[dict[str, Any]] = [
    {"ok": True, "v": None, "w": 3},
    {"ok": True, "v": b"value" * 9, "w": 0},
    {"ok": True, "v": b"", "w": 1},
    {"ok": False, "v": None, "err": "not found", "w": 2},
    {"ok": True, "v": None, "existed": True, "w": 1},
    {"ok": True, "v": None, "existed": False, "w": 1},
    {"ok": False, "v": None, "err": "timed out after 5.0s: shard 7 is moving to this worker"},
    {"ok": False, "v": None, "err": "shard 3: too many forwarding hops"},
]


@pytest.mark.parametrize("r", REPLIES)
def test_reply_round_trip(r: dict[str, Any]) -> None:
    back = decode_reply(encode_reply(r))
    assert {k: bytes(v) if isinstance(v, memoryview) else v for k, v in back.items()} == r


def test_reply_value_is_a_view_not_a_copy() -> None:
    rec = encode_reply({"ok": True, "v": b"abc", "w": 1})
    v = decode_reply(rec)["v"]
    assert isinstance(v, memoryview) and v.obj is rec and bytes(v) == b"abc"


@pytest.mark.parametrize("r", [{"ok": True, "v": b"x", "err": "y"}, {"v": None},
                               {"ok": True, "v": None, "junk": 1}])
def test_reply_shapes_outside_the_protocol_are_refused(r: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        encode_reply(r)


@pytest.mark.parametrize("rec", [
    b"", b"\x01", bytes([OP_TAG, 9]) + bytes(13),                         # short, bad op
    encode_op("get", "k", None, 1, 1)[:-1],                               # key cut short
    bytes([OP_TAG, 1]) + bytes(8) + b"\x00" + (5).to_bytes(4, "little") + b"\xff\xfe\xfd\xfc\xfb",
])
def test_bad_op_records_are_refused(rec: bytes) -> None:
    with pytest.raises(ValueError):
        decode_op(rec)


@pytest.mark.parametrize("rec", [b"\x00", bytes([255, 255, 0]), bytes([2 | 4, 0, 0]) + b"x"])
def test_bad_reply_records_are_refused(rec: bytes) -> None:
    with pytest.raises(ValueError):
        decode_reply(rec)


def test_migration_round_trip_and_junk() -> None:
    rec = encode_migration(17, 4, True, {"a": b"1", "b": b""})
    assert rec[0] == MIG_TAG
    assert decode_migration(rec) == (17, 4, True, {"a": b"1", "b": b""})
    for bad in (bytes([MIG_TAG]) + b"\xc1", encode_migration(5000, 1, True, {}),
                bytes([MIG_TAG]) + b"\x94\x01\x01\xc3\x81\x01\xc4\x00",   # int key
                bytes([MIG_TAG]) + b"\xdd\xff\xff\xff\xff"):               # huge array
        with pytest.raises(ValueError):
            decode_migration(bad)
