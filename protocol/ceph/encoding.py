"""Ceph's primitive encodings (``denc``/``encode()`` semantics), strict and bounded.

Everything Ceph puts in a control payload or a message front is built from a handful of
primitives, all little-endian and unaligned:

- integers: ``u8 u16 u32 u64 i32 i64`` (``__le16`` etc.);
- ``string``/``bytes``: le32 length, then the bytes (a ``bufferlist`` is the same);
- ``vector<T>``: le32 count, then the items; ``map<K, V>``: le32 count, then key, value;
- ``utime_t``: le32 sec, le32 nsec; ``uuid_d``: 16 raw bytes;
- a *versioned struct* (``ENCODE_START(v, compat)``): u8 struct_v, u8 struct_compat,
  le32 body length, then the body.

Versioned structs are how Ceph evolves formats: a newer release appends fields and bumps
``struct_v``; it bumps ``compat`` only when an older decoder could not make sense of the
body any more. So :meth:`Decoder.struct_start` reads the header, refuses a compat newer
than this decoder knows (the message says which version we understand), bounds the body
by its declared length, and :meth:`Decoder.struct_end` skips whatever a newer version
appended after the fields this version decoded.

Bounds: every read checks the bytes that remain *before* slicing; a count is checked
against the bytes left (each item takes at least one byte) and against a caller cap before
anything is allocated. All failures are ``RemoteProtocolError(code="bad_encoding")``
naming what was being decoded.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Iterable
from typing import NoReturn, TypeVar

from ..buffer import Buffer
from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = ["MAX_COUNT", "MAX_STRING", "Buffer", "Decoder", "Encoder", "decoder"]

T = TypeVar("T")
K = TypeVar("K")

#: default cap on a string/bytes length field (Ceph messages stay far below it)
MAX_STRING = 16 * 1024 * 1024
#: default cap on a vector/map count
MAX_COUNT = 1 << 16

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I16 = struct.Struct("<h")
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
_STRUCT_HEAD = struct.Struct("<BBI")


class Decoder:
    """A cursor over one encoded buffer. ``what`` names the thing decoded, for errors.

    ``end`` is the current hard limit: inside a versioned struct it is the struct's end,
    so a field can never read past the body its header declared.
    """

    __slots__ = ("buf", "end", "pos", "what")

    def __init__(self, buf: Buffer, what: str) -> None:
        mv = buf if isinstance(buf, memoryview) else memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        self.buf = mv
        self.pos = 0
        self.end = len(mv)
        self.what = what

    def fail(self, field: str, problem: str) -> NoReturn:
        raise RemoteProtocolError(f"{self.what}: {field} {problem}", "bad_encoding")

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, field: str) -> memoryview:
        left = self.end - self.pos
        if n < 0 or n > left:
            self.fail(field, f"needs {n} bytes but only {left} remain (truncated)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def _int(self, st: struct.Struct, field: str) -> int:
        value: int = st.unpack(self.take(st.size, field))[0]
        return value

    def u8(self, field: str) -> int:
        return self._int(_U8, field)

    def u16(self, field: str) -> int:
        return self._int(_U16, field)

    def u32(self, field: str) -> int:
        return self._int(_U32, field)

    def u64(self, field: str) -> int:
        return self._int(_U64, field)

    def i16(self, field: str) -> int:
        return self._int(_I16, field)

    def i32(self, field: str) -> int:
        return self._int(_I32, field)

    def i64(self, field: str) -> int:
        return self._int(_I64, field)

    def boolean(self, field: str) -> bool:
        b = self.u8(field)
        if b > 1:
            self.fail(field, f"bool byte is {b}, must be 0 or 1")
        return b == 1

    def raw(self, n: int, field: str) -> bytes:
        return bytes(self.take(n, field))

    def blob(self, field: str, cap: int = MAX_STRING) -> bytes:
        """le32 length + bytes (``bufferlist``, ``string``)."""
        n = self.u32(field)
        if n > cap:
            self.fail(field, f"announces {n} bytes, cap {cap}")
        return bytes(self.take(n, field))

    def string(self, field: str, cap: int = MAX_STRING) -> str:
        data = self.blob(field, cap)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(field, "is not valid UTF-8")

    def count(self, field: str, cap: int = MAX_COUNT, min_item: int = 1) -> int:
        """A le32 count, checked against ``cap`` and against the bytes left."""
        n = self.u32(field)
        if n > cap:
            self.fail(field, f"has {n} entries, at most {cap} allowed")
        if n * min_item > self.remaining:
            self.fail(field, f"has {n} entries but only {self.remaining} bytes remain "
                             "(truncated)")
        return n

    def vector(self, field: str, item: Callable[[Decoder, str], T], cap: int = MAX_COUNT,
               min_item: int = 1) -> list[T]:
        n = self.count(field, cap, min_item)
        return [item(self, f"{field}[{i}]") for i in range(n)]

    def mapping(self, field: str, key: Callable[[Decoder, str], K],
                value: Callable[[Decoder, str], T], cap: int = MAX_COUNT,
                min_item: int = 2) -> dict[K, T]:
        n = self.count(field, cap, min_item)
        out: dict[K, T] = {}
        for i in range(n):
            k = key(self, f"{field}[{i}].key")
            out[k] = value(self, f"{field}[{k!r}]")
        return out

    def utime(self, field: str) -> tuple[int, int]:
        sec = self.u32(field + ".sec")
        nsec = self.u32(field + ".nsec")
        return (sec, nsec)

    def uuid(self, field: str) -> uuid.UUID:
        return uuid.UUID(bytes=bytes(self.take(16, field)))

    def struct_start(self, field: str, version: int) -> tuple[int, int]:
        """Enter a versioned struct this code knows up to ``version``.

        Returns ``(struct_v, outer_end)``: decode the fields ``struct_v`` has, then call
        :meth:`struct_end` with ``outer_end``. A compat newer than ``version`` means the
        peer's encoding cannot be read by us, and is refused.
        """
        v, compat, length = _STRUCT_HEAD.unpack(self.take(_STRUCT_HEAD.size, field))
        if compat > version:
            self.fail(field, f"is encoded as v{v} with compat v{compat}; this decoder knows "
                             f"up to v{version}: the peer runs a newer, incompatible "
                             "release")
        if v < compat:
            self.fail(field, f"struct_v {v} is below its compat {compat} (corrupt)")
        left = self.end - self.pos
        if length > left:
            self.fail(field, f"declares a {length}-byte body but only {left} bytes remain "
                             "(truncated)")
        outer = self.end
        self.end = self.pos + length
        return v, outer

    def struct_end(self, outer_end: int) -> None:
        """Leave a versioned struct: skip fields a newer version appended after ours."""
        self.pos = self.end
        self.end = outer_end

    def finish(self) -> None:
        """Refuse trailing bytes after the last field of a top-level encoding."""
        extra = self.end - self.pos
        if extra:
            self.fail("end", f"followed by {extra} trailing bytes")


def decoder(buf: Buffer, what: str) -> Decoder:
    return Decoder(buf, what)


class Encoder:
    """Builds one encoding. Out-of-range values are ``LocalProtocolError`` naming the field."""

    __slots__ = ("buf", "what")

    def __init__(self, what: str) -> None:
        self.buf = bytearray()
        self.what = what

    def fail(self, field: str, problem: str) -> NoReturn:
        raise LocalProtocolError(f"{self.what}.{field} {problem}", "bad_field")

    def _int(self, st: struct.Struct, kind: str, field: str, value: int) -> Encoder:
        # bool is an int subclass; accepting True for a u64 would hide caller bugs.
        if type(value) is not int:
            self.fail(field, f"must be an int ({kind}), got {value!r}")
        try:
            self.buf += st.pack(value)
        except struct.error:
            self.fail(field, f"must be in range for {kind}, got {value!r}")
        return self

    def u8(self, value: int, field: str = "u8") -> Encoder:
        return self._int(_U8, "u8", field, value)

    def u16(self, value: int, field: str = "u16") -> Encoder:
        return self._int(_U16, "u16", field, value)

    def u32(self, value: int, field: str = "u32") -> Encoder:
        return self._int(_U32, "u32", field, value)

    def u64(self, value: int, field: str = "u64") -> Encoder:
        return self._int(_U64, "u64", field, value)

    def i16(self, value: int, field: str = "i16") -> Encoder:
        return self._int(_I16, "i16", field, value)

    def i32(self, value: int, field: str = "i32") -> Encoder:
        return self._int(_I32, "i32", field, value)

    def i64(self, value: int, field: str = "i64") -> Encoder:
        return self._int(_I64, "i64", field, value)

    def boolean(self, value: bool, field: str = "bool") -> Encoder:
        if type(value) is not bool:
            self.fail(field, f"must be a bool, got {value!r}")
        self.buf.append(1 if value else 0)
        return self

    def raw(self, data: Buffer, field: str = "raw") -> Encoder:
        if not isinstance(data, bytes | bytearray | memoryview):
            self.fail(field, f"must be bytes, got {data!r}")
        self.buf += data
        return self

    def blob(self, data: Buffer, field: str = "blob") -> Encoder:
        if not isinstance(data, bytes | bytearray | memoryview):
            self.fail(field, f"must be bytes, got {data!r}")
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if n > 0xFFFFFFFF:
            self.fail(field, "is longer than a le32 length can say")
        self.buf += _U32.pack(n)
        self.buf += data
        return self

    def string(self, text: str, field: str = "string") -> Encoder:
        if not isinstance(text, str):
            self.fail(field, f"must be a str, got {text!r}")
        return self.blob(text.encode("utf-8"), field)

    def count(self, n: int, field: str = "count") -> Encoder:
        return self.u32(n, field)

    def vector(self, items: Iterable[T], item: Callable[[Encoder, T], object],
               field: str = "vector") -> Encoder:
        seq = list(items)
        self.count(len(seq), field)
        for x in seq:
            item(self, x)
        return self

    def utime(self, stamp: tuple[int, int], field: str = "utime") -> Encoder:
        self.u32(stamp[0], field + ".sec")
        return self.u32(stamp[1], field + ".nsec")

    def uuid(self, value: uuid.UUID, field: str = "uuid") -> Encoder:
        if not isinstance(value, uuid.UUID):
            self.fail(field, f"must be a uuid.UUID, got {value!r}")
        self.buf += value.bytes
        return self

    def struct_start(self, version: int, compat: int) -> int:
        """``ENCODE_START(version, compat)``: returns the mark for :meth:`struct_end`."""
        if not 1 <= compat <= version <= 255:
            self.fail("struct", f"needs 1 <= compat ({compat}) <= version ({version}) <= 255")
        mark = len(self.buf)
        self.buf += _STRUCT_HEAD.pack(version, compat, 0)
        return mark

    def struct_end(self, mark: int) -> Encoder:
        """``ENCODE_FINISH``: patch the body length of the struct opened at ``mark``."""
        length = len(self.buf) - mark - _STRUCT_HEAD.size
        _U32.pack_into(self.buf, mark + 2, length)
        return self

    def getvalue(self) -> bytes:
        return bytes(self.buf)
