"""The kv app's records on the ring mesh (``submit_to`` payloads and their replies).

A forwarded request carries the key and the value as raw bytes behind a small fixed
header: the worker that received the client's message decoded its msgpack front once (it
needed the key to route), and nothing decodes or re-encodes the value on the way. The
reply comes back the same way; only the worker that owns the client connection encodes
the reply front, once, when it sends it.

* op request: ``<B tag=1><B op><Q map version><B hops><I key length>`` key (UTF-8), value
  (the rest; PUT only)
* reply to an op: ``<B flags><h worker>`` then the value or the error text (the rest)
* shard data: ``<B tag=2>`` msgpack ``[shard, map version, last, {key: value}]``

Records come from another worker of the same pool, but they are checked like any input
(lengths, codes, types): a malformed one is answered with an error, never trusted.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from .shards import NSHARDS

__all__ = ["MIG_TAG", "OP_TAG", "Reply", "decode_migration", "decode_op", "decode_reply",
           "encode_migration", "encode_op", "encode_reply"]

#: a reply as the client sees it, less ``id`` and ``at`` (added by the connection's owner)
Reply = dict[str, Any]

OP_TAG, MIG_TAG = 1, 2
_OP = struct.Struct("<BBQBI")
_OPS = ("put", "get", "del")
_OP_CODE = {name: i for i, name in enumerate(_OPS)}
_REPLY = struct.Struct("<Bh")
_OK, _V, _ERR, _HAS_EXISTED, _EXISTED, _W = 1, 2, 4, 8, 16, 32
_REPLY_KEYS = frozenset(("ok", "v", "err", "existed", "w"))


def encode_op(op: str, key: str, val: bytes | None, version: int, hops: int) -> bytes:
    """A request for the shard's owner (``val`` only for PUT)."""
    k = key.encode()
    return b"".join((_OP.pack(OP_TAG, _OP_CODE[op], version, hops, len(k)), k,
                     val if op == "put" and val is not None else b""))


def decode_op(rec: bytes) -> tuple[str, str, bytes | None, int, int]:
    """``(op, key, value, map version, hops)`` of an op request; ValueError if malformed."""
    if len(rec) < _OP.size:
        raise ValueError(f"kv op record of {len(rec)} bytes, header is {_OP.size}")
    tag, code, version, hops, klen = _OP.unpack_from(rec)
    if tag != OP_TAG or code >= len(_OPS):
        raise ValueError(f"kv op record with tag {tag} and op code {code}")
    end = _OP.size + klen
    if end > len(rec):
        raise ValueError(f"kv op record announces a {klen}-byte key in {len(rec)} bytes")
    try:
        key = rec[_OP.size:end].decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"kv op record key is not UTF-8: {exc}") from None
    op = _OPS[code]
    return op, key, (rec[end:] if op == "put" else None), version, hops


def encode_reply(r: Reply) -> bytes:
    """The ring form of a reply :meth:`KvApp._handle` produced."""
    if not _REPLY_KEYS.issuperset(r) or "ok" not in r:
        raise ValueError(f"kv reply with keys {sorted(r)}")
    flags = _OK if r["ok"] else 0
    body = b""
    v, err = r.get("v"), r.get("err")
    if v is not None:
        flags |= _V
        body = v
    if err is not None:
        if v is not None:
            raise ValueError("a kv reply carries a value or an error, not both")
        flags |= _ERR
        body = str(err).encode()
    if "existed" in r:
        flags |= _HAS_EXISTED | (_EXISTED if r["existed"] else 0)
    w = r.get("w")
    if w is not None:
        flags |= _W
    return _REPLY.pack(flags, -1 if w is None else int(w)) + body


def decode_reply(rec: bytes) -> Reply:
    """The reply dict of :func:`encode_reply` (the value a view of ``rec``: no copy)."""
    if len(rec) < _REPLY.size:
        raise ValueError(f"kv reply record of {len(rec)} bytes, header is {_REPLY.size}")
    flags, w = _REPLY.unpack_from(rec)
    if flags >= 64 or (flags & _V and flags & _ERR):
        raise ValueError(f"kv reply record with flags {flags:#x}")
    body = memoryview(rec)[_REPLY.size:]
    r: Reply = {"ok": bool(flags & _OK), "v": body if flags & _V else None}
    if flags & _ERR:
        r["err"] = bytes(body).decode("utf-8", "replace")
    if flags & _HAS_EXISTED:
        r["existed"] = bool(flags & _EXISTED)
    if flags & _W:
        r["w"] = w
    return r


def encode_migration(shard: int, version: int, last: bool, chunk: dict[str, bytes]) -> bytes:
    """One chunk of a shard's data for its new owner."""
    packed: bytes = msgpack.packb([shard, version, last, chunk], use_bin_type=True)
    return bytes((MIG_TAG,)) + packed


def decode_migration(rec: bytes) -> tuple[int, int, bool, dict[str, bytes]]:
    """``(shard, map version, last, {key: value})``; ValueError if malformed."""
    n = len(rec)
    try:
        v = msgpack.unpackb(memoryview(rec)[1:], raw=False, max_str_len=n, max_bin_len=n,
                            max_array_len=n, max_map_len=n, max_ext_len=n)
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as exc:
        raise ValueError(f"kv shard record is not msgpack: {exc}") from None
    if not (isinstance(v, list) and len(v) == 4 and type(v[0]) is int and 0 <= v[0] < NSHARDS
            and type(v[1]) is int and type(v[2]) is bool and isinstance(v[3], dict)
            and all(isinstance(k, str) and isinstance(x, bytes) for k, x in v[3].items())):
        raise ValueError("kv shard record is not [shard, version, last, {str: bytes}]")
    return v[0], v[1], v[2], v[3]
