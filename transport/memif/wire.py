"""memif wire format, protocol version 2.0 as DPDK 22.11 speaks it (shared/notes/memif.md §3).

Facts come from DPDK's ``drivers/net/memif/memif.h`` (v22.11): every control message is
exactly 128 bytes, a little-endian u16 type at offset 0 and a packed body from offset 2,
the rest zero. Ring headers put ``tail`` on its own 64-byte cache line; descriptors are 16
bytes (``<HHIII``). Everything here is pure data: no sockets, no memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Union, cast

__all__ = [
    "MSG_SIZE", "VERSION", "COOKIE", "MsgType", "Hello", "Init", "AddRegion", "AddRing",
    "Connect", "Connected", "Disconnect", "Ack", "Message", "pack", "unpack", "WireError",
    "RING_COOKIE_OFF", "RING_FLAGS_OFF", "RING_HEAD_OFF", "RING_TAIL_OFF", "RING_DESC_OFF",
    "DESC_SIZE", "RING_FLAG_MASK_INT", "DESC_FLAG_NEXT", "RING_FLAG_C2S", "ring_bytes",
    "NAME_LEN", "SECRET_LEN", "REASON_LEN", "MAX_LOG2_RING", "MAX_REGIONS", "MAX_QUEUES",
    "MODE_ETHERNET",
]

MSG_SIZE = 128
#: (major << 8) | minor; DPDK requires INIT.version == 0x0200 exactly.
VERSION = (2 << 8) | 0
#: Ring cookie of protocol 2.0 (VPP's old 1.0 header has 0x3E31F10: not interoperable).
COOKIE = 0x3E31F20

NAME_LEN = 32
SECRET_LEN = 24
REASON_LEN = 96
MODE_ETHERNET = 0
MAX_LOG2_RING = 14
MAX_REGIONS = 256
MAX_QUEUES = 255

# Ring header for 64-byte cache lines (x86): cookie u32 @0, flags u16 @4, head u16 @6,
# tail u16 @64 (own line so the two writers never share one), descriptors from 128.
RING_COOKIE_OFF = 0
RING_FLAGS_OFF = 4
RING_HEAD_OFF = 6
RING_TAIL_OFF = 64
RING_DESC_OFF = 128
DESC_SIZE = 16
#: Ring flag set by a ring's *reader*: "I poll, do not kick my eventfd".
RING_FLAG_MASK_INT = 1
#: Descriptor flag: the frame continues in the next slot.
DESC_FLAG_NEXT = 1
#: ADD_RING flag bit 0: the ring carries client-to-server traffic.
RING_FLAG_C2S = 1


def ring_bytes(log2_size: int) -> int:
    """Bytes one ring (header + descriptors) takes in a region."""
    return RING_DESC_OFF + DESC_SIZE * (1 << log2_size)


class WireError(ValueError):
    """A control message violates the protocol (size, type, field range, padding)."""


class MsgType:
    NONE = 0
    ACK = 1
    HELLO = 2
    INIT = 3
    ADD_REGION = 4
    ADD_RING = 5
    CONNECT = 6
    CONNECTED = 7
    DISCONNECT = 8


def _cstr(raw: bytes) -> bytes:
    """A fixed-size C string field: bytes up to the first NUL."""
    return raw.split(b"\0", 1)[0]


def _field(value: bytes, size: int, what: str) -> bytes:
    if len(value) > size:
        raise WireError(f"{what} is {len(value)} bytes, at most {size} fit")
    return value


@dataclass(frozen=True)
class Hello:
    """S→C right after accept: what the server supports (``max_*`` are highest numbers)."""

    TYPE: ClassVar[int] = MsgType.HELLO
    FMT: ClassVar[struct.Struct] = struct.Struct("<32sHHHHHB")
    name: bytes = b""
    min_version: int = VERSION
    max_version: int = VERSION
    max_region: int = MAX_REGIONS - 1
    max_s2c_ring: int = MAX_QUEUES
    max_c2s_ring: int = MAX_QUEUES
    max_log2_ring_size: int = MAX_LOG2_RING

    def fields(self) -> tuple[Any, ...]:
        return (_field(self.name, NAME_LEN, "name"), self.min_version, self.max_version,
                self.max_region, self.max_s2c_ring, self.max_c2s_ring, self.max_log2_ring_size)

    @classmethod
    def build(cls, t: tuple[Any, ...]) -> "Hello":
        return cls(_cstr(t[0]), *t[1:])


@dataclass(frozen=True)
class Init:
    """C→S: version, interface id, mode, secret, client name."""

    TYPE: ClassVar[int] = MsgType.INIT
    FMT: ClassVar[struct.Struct] = struct.Struct("<HIB24s32s")
    version: int = VERSION
    id: int = 0
    mode: int = MODE_ETHERNET
    secret: bytes = b""
    name: bytes = b""

    def fields(self) -> tuple[Any, ...]:
        return (self.version, self.id, self.mode, _field(self.secret, SECRET_LEN, "secret"),
                _field(self.name, NAME_LEN, "name"))

    @classmethod
    def build(cls, t: tuple[Any, ...]) -> "Init":
        return cls(t[0], t[1], t[2], _cstr(t[3]), _cstr(t[4]))


@dataclass(frozen=True)
class AddRegion:
    """C→S with the region fd (SCM_RIGHTS): region ``index`` of ``size`` bytes."""

    TYPE: ClassVar[int] = MsgType.ADD_REGION
    FMT: ClassVar[struct.Struct] = struct.Struct("<HQ")
    index: int
    size: int

    def fields(self) -> tuple[Any, ...]:
        return (self.index, self.size)

    @classmethod
    def build(cls, t: tuple[Any, ...]) -> "AddRegion":
        return cls(*t)


@dataclass(frozen=True)
class AddRing:
    """C→S with the ring's eventfd: where the ring header lives and how big it is."""

    TYPE: ClassVar[int] = MsgType.ADD_RING
    FMT: ClassVar[struct.Struct] = struct.Struct("<HHHIBH")
    flags: int
    index: int
    region: int
    offset: int
    log2_ring_size: int
    private_hdr_size: int = 0

    @property
    def c2s(self) -> bool:
        return bool(self.flags & RING_FLAG_C2S)

    def fields(self) -> tuple[Any, ...]:
        return (self.flags, self.index, self.region, self.offset, self.log2_ring_size,
                self.private_hdr_size)

    @classmethod
    def build(cls, t: tuple[Any, ...]) -> "AddRing":
        return cls(*t)


@dataclass(frozen=True)
class Connect:
    """C→S: all regions and rings are announced; map them and go up."""

    TYPE: ClassVar[int] = MsgType.CONNECT
    FMT: ClassVar[struct.Struct] = struct.Struct("<32s")
    if_name: bytes = b""

    def fields(self) -> tuple[Any, ...]:
        return (_field(self.if_name, NAME_LEN, "if_name"),)

    @classmethod
    def build(cls, t: tuple[Any, ...]) -> "Connect":
        return cls(_cstr(t[0]))


@dataclass(frozen=True)
class Connected(Connect):
    """S→C: the link is up."""

    TYPE: ClassVar[int] = MsgType.CONNECTED


@dataclass(frozen=True)
class Disconnect:
    """Either way: the connection ends, with a numeric code and a reason string."""

    TYPE: ClassVar[int] = MsgType.DISCONNECT
    FMT: ClassVar[struct.Struct] = struct.Struct("<I96s")
    code: int = 0
    reason: bytes = b""

    def fields(self) -> tuple[Any, ...]:
        return (self.code, _field(self.reason, REASON_LEN, "reason"))

    @classmethod
    def build(cls, t: tuple[Any, ...]) -> "Disconnect":
        return cls(t[0], _cstr(t[1]))


@dataclass(frozen=True)
class Ack:
    """S→C: the previous C→S message was accepted."""

    TYPE: ClassVar[int] = MsgType.ACK
    FMT: ClassVar[struct.Struct] = struct.Struct("<")

    def fields(self) -> tuple[Any, ...]:
        return ()

    @classmethod
    def build(cls, t: tuple[Any, ...]) -> "Ack":
        return cls()


Message = Union[Hello, Init, AddRegion, AddRing, Connect, Connected, Disconnect, Ack]
_BY_TYPE: dict[int, Any] = {c.TYPE: c for c in
                             (Hello, Init, AddRegion, AddRing, Connect, Connected, Disconnect, Ack)}
_TYPE = struct.Struct("<H")


def pack(msg: Message) -> bytes:
    """The 128-byte datagram for ``msg``."""
    body = msg.FMT.pack(*msg.fields())
    out = _TYPE.pack(msg.TYPE) + body
    return out + bytes(MSG_SIZE - len(out))


def unpack(data: bytes | bytearray | memoryview) -> Message:
    """Parse one datagram; raises :class:`WireError` on any deviation.

    Strict: exactly 128 bytes (DPDK disconnects with "Invalid message size" otherwise), a
    known type, and zero padding after the body (a non-zero tail means a peer with another
    layout, e.g. VPP's protocol 1.0).
    """
    if len(data) != MSG_SIZE:
        raise WireError(f"invalid message size {len(data)}, expected {MSG_SIZE}")
    data = bytes(data)
    (mtype,) = _TYPE.unpack_from(data, 0)
    cls = _BY_TYPE.get(mtype)
    if cls is None:
        raise WireError(f"unknown message type {mtype}")
    end = 2 + cls.FMT.size
    if any(data[end:]):
        raise WireError(f"message type {mtype} has non-zero bytes after its {cls.FMT.size}-byte body")
    msg: Any = cls.build(cls.FMT.unpack_from(data, 2))
    if isinstance(msg, AddRing):
        if not 1 <= msg.log2_ring_size <= MAX_LOG2_RING:
            raise WireError(f"log2 ring size {msg.log2_ring_size} outside 1..{MAX_LOG2_RING}")
        if msg.index >= MAX_QUEUES:
            raise WireError(f"ring index {msg.index} >= {MAX_QUEUES}")
    if isinstance(msg, AddRegion) and (msg.index >= MAX_REGIONS or msg.size == 0):
        raise WireError(f"bad region {msg.index} of size {msg.size}")
    return cast(Message, msg)
