"""Payloads of the non-MESSAGE frames: fixed little-endian encodings, strictly decoded.

Each frame type is a frozen, slotted dataclass with a ``TAG`` and a ``_SCHEMA`` (field
name, wire kind) from which one generic codec encodes and decodes it, so every type gets
the same validation: exact length, no trailing bytes, list counts <= 16, strings valid
UTF-8 of <= 255 bytes, bools in {0, 1}. Length fields are checked against the bytes that
remain *before* anything is sliced or allocated. Every violation is a
``RemoteProtocolError(code="bad_payload")`` naming the frame and the field.

Wire kinds: ``u8 u16 u32 u64 i32 i64`` little-endian integers; ``bool`` one byte;
``bytes`` le32 length + bytes; ``u32list`` le32 count + le32 items; ``addr`` Ceph's
entity_addr_t and ``addrs`` its entity_addrvec_t (:mod:`protocol.ceph.addr`, with
ENCODE_START honoured); ``sig`` exactly 32 raw bytes. These are Ceph's msgr2.1 payloads
(``notes/msgr2-wire.md``), so a real ceph-mon parses every frame we send.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn, Self, TypeVar

from .ceph.addr import EntityAddr, decode_addr, decode_addrvec, encode_addr, encode_addrvec
from .ceph.encoding import Decoder, Encoder
from .errors import LocalProtocolError, RemoteProtocolError
from .frames import Buffer, Tag, encode_frame

__all__ = [
    "AUTH_CEPHX",
    "AUTH_GSS",
    "AUTH_METHOD_NAMES",
    "AUTH_NONE",
    "AUTH_SECRET",
    "MODE_NAMES",
    "CONTROL_TYPES",
    "IDENT_FLAG_LOSSY",
    "MAX_LIST",
    "MAX_STR",
    "MODE_CRC",
    "MODE_SECURE",
    "Ack",
    "AuthBadMethod",
    "AuthDone",
    "AuthReplyMore",
    "AuthRequest",
    "AuthRequestMore",
    "AuthSignature",
    "ClientIdent",
    "ControlFrame",
    "EntityAddr",
    "Hello",
    "IdentMissingFeatures",
    "Keepalive2",
    "Keepalive2Ack",
    "ServerIdent",
    "SessionReconnect",
    "SessionReconnectOk",
    "SessionReset",
    "SessionRetry",
    "SessionRetryGlobal",
    "Wait",
    "decode_control",
    "encode_control",
]

IDENT_FLAG_LOSSY = 1
#: Ceph's auth method numbers: none 1, cephx 2, gss 4 (CEPH_AUTH_*)
AUTH_NONE = 1
AUTH_CEPHX = 2
AUTH_GSS = 4
#: asyncmsgr's shared-secret method, between asyncmsgr peers only: a number Ceph does not
#: use, so a Ceph peer answers AUTH_BAD_METHOD instead of misparsing our payload.
AUTH_SECRET = 0x41
AUTH_METHOD_NAMES = {AUTH_NONE: "none", AUTH_CEPHX: "cephx", AUTH_GSS: "gss",
                     AUTH_SECRET: "asyncmsgr-secret"}
MODE_CRC = 1
#: Ceph's secure mode with cephx; under AUTH_SECRET it is asyncmsgr's own AES-GCM records
MODE_SECURE = 2
MODE_NAMES = {MODE_CRC: "crc", MODE_SECURE: "secure"}

MAX_LIST = 16
MAX_STR = 255
SIG_SIZE = 32

_INT_FORMATS = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "i32": "i", "i64": "q"}
_STRUCTS = {kind: struct.Struct("<" + fmt) for kind, fmt in _INT_FORMATS.items()}
_U8 = _STRUCTS["u8"]
_U32 = _STRUCTS["u32"]


def _bad(frame: str, field: str, what: str) -> NoReturn:
    raise RemoteProtocolError(f"{frame} payload: {field} {what}", "bad_payload")


def _view(payload: Buffer) -> memoryview:
    mv = payload if isinstance(payload, memoryview) else memoryview(payload)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


class _Reader:
    """Cursor over one payload; every read checks the remaining length first."""

    __slots__ = ("buf", "frame", "pos")

    def __init__(self, buf: memoryview, frame: str) -> None:
        self.buf = buf
        self.pos = 0
        self.frame = frame

    def take(self, n: int, field: str) -> memoryview:
        left = len(self.buf) - self.pos
        if n > left:
            _bad(self.frame, field, f"needs {n} bytes but only {left} remain (truncated)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, field: str) -> tuple[Any, ...]:
        return st.unpack(self.take(st.size, field))

    def count(self, field: str) -> int:
        (n,) = self.unpack(_U32, field)
        if n > MAX_LIST:
            _bad(self.frame, field, f"has {n} entries, at most {MAX_LIST} allowed")
        return int(n)

    def finish(self) -> None:
        extra = len(self.buf) - self.pos
        if extra:
            _bad(self.frame, "end", f"followed by {extra} trailing bytes")


_T = TypeVar("_T")


def _read_ceph(r: _Reader, field: str, decode: Callable[[Decoder, str], _T]) -> _T:
    """A Ceph-encoded value at the cursor (ENCODE_START honoured), its errors worded as
    this frame's bad payload."""
    dec = Decoder(r.buf, f"{r.frame} payload")
    dec.pos = r.pos
    try:
        value = decode(dec, field)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(exc.reason, "bad_payload") from None
    r.pos = dec.pos
    return value


def _read_addr(r: _Reader, field: str) -> EntityAddr:
    """entity_addr_t at the cursor."""
    return _read_ceph(r, field, decode_addr)


def _read_addrvec(r: _Reader, field: str) -> tuple[EntityAddr, ...]:
    return _read_ceph(r, field, decode_addrvec)


# -- per-kind codecs ------------------------------------------------------------------

def _dec_bool(r: _Reader, field: str) -> bool:
    b: int = r.unpack(_U8, field)[0]
    if b > 1:
        _bad(r.frame, field, f"bool byte is {b}, must be 0 or 1")
    return b == 1


def _dec_bytes(r: _Reader, field: str) -> bytes:
    (n,) = r.unpack(_U32, field)
    return bytes(r.take(n, field))


def _dec_u32list(r: _Reader, field: str) -> tuple[int, ...]:
    n = r.count(field)
    return struct.unpack(f"<{n}I", r.take(4 * n, field))


def _dec_sig(r: _Reader, field: str) -> bytes:
    return bytes(r.take(SIG_SIZE, field))


def _int_decoder(st: struct.Struct) -> Callable[[_Reader, str], Any]:
    def dec(r: _Reader, field: str) -> Any:
        return r.unpack(st, field)[0]
    return dec


_DECODERS: dict[str, Callable[[_Reader, str], Any]] = {
    kind: _int_decoder(st) for kind, st in _STRUCTS.items()}
_DECODERS.update(bool=_dec_bool, bytes=_dec_bytes, u32list=_dec_u32list, addr=_read_addr,
                 addrs=_read_addrvec, sig=_dec_sig)


def _enc_fail(frame: str, field: str, value: object, want: str) -> NoReturn:
    raise LocalProtocolError(f"{frame}.{field} must be {want}, got {value!r}", "bad_field")


def _enc_int(kind: str) -> Callable[[str, str, Any], bytes]:
    st = _STRUCTS[kind]

    def enc(frame: str, field: str, value: Any) -> bytes:
        # bool is an int subclass; accepting True for a u64 would hide caller bugs.
        if type(value) is not int:
            _enc_fail(frame, field, value, f"an int ({kind})")
        try:
            return st.pack(value)
        except struct.error:
            _enc_fail(frame, field, value, f"in range for {kind}")
    return enc


def _enc_bool(frame: str, field: str, value: Any) -> bytes:
    if type(value) is not bool:
        _enc_fail(frame, field, value, "a bool")
    return b"\x01" if value else b"\x00"


def _enc_bytes(frame: str, field: str, value: Any) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        _enc_fail(frame, field, value, "bytes")
    data = bytes(value)
    return _U32.pack(len(data)) + data


def _enc_u32list(frame: str, field: str, value: Any) -> bytes:
    items = tuple(value) if isinstance(value, tuple | list) else None
    if items is None or len(items) > MAX_LIST or any(type(v) is not int for v in items):
        _enc_fail(frame, field, value, f"a sequence of <= {MAX_LIST} ints")
    try:
        return _U32.pack(len(items)) + struct.pack(f"<{len(items)}I", *items)
    except struct.error:
        _enc_fail(frame, field, value, "u32 values")


def _enc_addr(frame: str, field: str, value: Any) -> bytes:
    if not isinstance(value, EntityAddr):
        _enc_fail(frame, field, value, "an EntityAddr")
    enc = Encoder(f"{frame}.{field}")
    encode_addr(enc, value)
    return enc.getvalue()


def _enc_addrs(frame: str, field: str, value: Any) -> bytes:
    items = tuple(value) if isinstance(value, tuple | list) else None
    if items is None or len(items) > MAX_LIST:
        _enc_fail(frame, field, value, f"a sequence of <= {MAX_LIST} EntityAddr")
    enc = Encoder(f"{frame}.{field}")
    encode_addrvec(enc, items)
    return enc.getvalue()


def _enc_sig(frame: str, field: str, value: Any) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview) or len(bytes(value)) != SIG_SIZE:
        _enc_fail(frame, field, value, f"exactly {SIG_SIZE} bytes")
    return bytes(value)


_ENCODERS: dict[str, Callable[[str, str, Any], bytes]] = {
    kind: _enc_int(kind) for kind in _STRUCTS}
_ENCODERS.update(bool=_enc_bool, bytes=_enc_bytes, u32list=_enc_u32list, addr=_enc_addr,
                 addrs=_enc_addrs, sig=_enc_sig)


class ControlFrame:
    """Base of all control payloads: a generic codec driven by the subclass ``_SCHEMA``.

    Subclasses whose fields are all fixed-size integers get a single precompiled
    ``struct.Struct`` (``_FIXED``) so hot frames (ACK, KEEPALIVE2) decode in one call.
    """

    __slots__ = ()
    TAG: ClassVar[Tag]
    _SCHEMA: ClassVar[tuple[tuple[str, str], ...]] = ()
    _FIXED: ClassVar[struct.Struct | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Fixed-layout types get one Struct for the whole payload (the hot path for ACK
        # etc.). Runs again for the class @dataclass(slots=True) rebuilds: same result.
        super().__init_subclass__(**kwargs)
        if all(kind in _INT_FORMATS for _, kind in cls._SCHEMA):
            cls._FIXED = struct.Struct("<" + "".join(_INT_FORMATS[k] for _, k in cls._SCHEMA))

    def encode(self) -> bytes:
        """The payload bytes; ``LocalProtocolError`` if a field is out of range."""
        name = type(self).__name__
        fixed = self._FIXED
        values = [getattr(self, field) for field, _ in self._SCHEMA]
        if fixed is not None and all(type(v) is int for v in values):
            try:
                return fixed.pack(*values)
            except struct.error:
                pass  # fall through: the per-field path names the offending field
        return b"".join(_ENCODERS[kind](name, field, value)
                        for (field, kind), value in zip(self._SCHEMA, values))

    @classmethod
    def decode(cls, payload: Buffer) -> Self:
        """Decode one payload exactly; ``RemoteProtocolError(code="bad_payload")`` if invalid."""
        mv = _view(payload)
        fixed = cls._FIXED
        if fixed is not None:
            if len(mv) != fixed.size:
                _bad(cls.__name__, "length", f"is {len(mv)} bytes, must be exactly {fixed.size}")
            return cls(*fixed.unpack(mv))
        r = _Reader(mv, cls.__name__)
        values = [_DECODERS[kind](r, field) for field, kind in cls._SCHEMA]
        r.finish()
        return cls(*values)

    def __init__(self, *args: Any) -> None:  # pragma: no cover - replaced by @dataclass
        raise TypeError("ControlFrame is abstract")


@dataclass(frozen=True, slots=True)
class Hello(ControlFrame):
    """First frame both ways: our entity type and the peer's address as we see it."""

    TAG: ClassVar[Tag] = Tag.HELLO
    _SCHEMA = (("entity_type", "u8"), ("peer_addr", "addr"))
    entity_type: int
    peer_addr: EntityAddr


@dataclass(frozen=True, slots=True)
class AuthRequest(ControlFrame):
    TAG: ClassVar[Tag] = Tag.AUTH_REQUEST
    _SCHEMA = (("method", "u32"), ("preferred_modes", "u32list"), ("payload", "bytes"))
    method: int
    preferred_modes: tuple[int, ...]
    payload: bytes


@dataclass(frozen=True, slots=True)
class AuthBadMethod(ControlFrame):
    TAG: ClassVar[Tag] = Tag.AUTH_BAD_METHOD
    _SCHEMA = (("method", "u32"), ("result", "i32"), ("allowed_methods", "u32list"),
               ("allowed_modes", "u32list"))
    method: int
    result: int
    allowed_methods: tuple[int, ...]
    allowed_modes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AuthReplyMore(ControlFrame):
    TAG: ClassVar[Tag] = Tag.AUTH_REPLY_MORE
    _SCHEMA = (("payload", "bytes"),)
    payload: bytes


@dataclass(frozen=True, slots=True)
class AuthRequestMore(ControlFrame):
    TAG: ClassVar[Tag] = Tag.AUTH_REQUEST_MORE
    _SCHEMA = (("payload", "bytes"),)
    payload: bytes


@dataclass(frozen=True, slots=True)
class AuthDone(ControlFrame):
    TAG: ClassVar[Tag] = Tag.AUTH_DONE
    _SCHEMA = (("global_id", "u64"), ("con_mode", "u32"), ("payload", "bytes"))
    global_id: int
    con_mode: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class AuthSignature(ControlFrame):
    """HMAC-SHA256 over the pre-auth transcript, raw 32 bytes (no length prefix)."""

    TAG: ClassVar[Tag] = Tag.AUTH_SIGNATURE
    _SCHEMA = (("sha256", "sig"),)
    sha256: bytes


@dataclass(frozen=True, slots=True)
class ClientIdent(ControlFrame):
    TAG: ClassVar[Tag] = Tag.CLIENT_IDENT
    _SCHEMA = (("addrs", "addrs"), ("target", "addr"), ("gid", "i64"), ("global_seq", "u64"),
               ("features_supported", "u64"), ("features_required", "u64"), ("flags", "u64"),
               ("client_cookie", "u64"))
    addrs: tuple[EntityAddr, ...]
    target: EntityAddr
    gid: int
    global_seq: int
    features_supported: int
    features_required: int
    flags: int
    client_cookie: int


@dataclass(frozen=True, slots=True)
class ServerIdent(ControlFrame):
    TAG: ClassVar[Tag] = Tag.SERVER_IDENT
    _SCHEMA = (("addrs", "addrs"), ("gid", "i64"), ("global_seq", "u64"),
               ("features_supported", "u64"), ("features_required", "u64"), ("flags", "u64"),
               ("server_cookie", "u64"))
    addrs: tuple[EntityAddr, ...]
    gid: int
    global_seq: int
    features_supported: int
    features_required: int
    flags: int
    server_cookie: int


@dataclass(frozen=True, slots=True)
class IdentMissingFeatures(ControlFrame):
    TAG: ClassVar[Tag] = Tag.IDENT_MISSING_FEATURES
    _SCHEMA = (("features", "u64"),)
    features: int


@dataclass(frozen=True, slots=True)
class SessionReconnect(ControlFrame):
    TAG: ClassVar[Tag] = Tag.SESSION_RECONNECT
    _SCHEMA = (("addrs", "addrs"), ("client_cookie", "u64"), ("server_cookie", "u64"),
               ("global_seq", "u64"), ("connect_seq", "u64"), ("msg_seq", "u64"))
    addrs: tuple[EntityAddr, ...]
    client_cookie: int
    server_cookie: int
    global_seq: int
    connect_seq: int
    msg_seq: int


@dataclass(frozen=True, slots=True)
class SessionReset(ControlFrame):
    TAG: ClassVar[Tag] = Tag.SESSION_RESET
    _SCHEMA = (("full", "bool"),)
    full: bool


@dataclass(frozen=True, slots=True)
class SessionRetry(ControlFrame):
    TAG: ClassVar[Tag] = Tag.SESSION_RETRY
    _SCHEMA = (("connect_seq", "u64"),)
    connect_seq: int


@dataclass(frozen=True, slots=True)
class SessionRetryGlobal(ControlFrame):
    TAG: ClassVar[Tag] = Tag.SESSION_RETRY_GLOBAL
    _SCHEMA = (("global_seq", "u64"),)
    global_seq: int


@dataclass(frozen=True, slots=True)
class SessionReconnectOk(ControlFrame):
    TAG: ClassVar[Tag] = Tag.SESSION_RECONNECT_OK
    _SCHEMA = (("msg_seq", "u64"),)
    msg_seq: int


@dataclass(frozen=True, slots=True)
class Wait(ControlFrame):
    """Empty payload: back off (max backoff) and retry."""

    TAG: ClassVar[Tag] = Tag.WAIT


@dataclass(frozen=True, slots=True)
class Keepalive2(ControlFrame):
    TAG: ClassVar[Tag] = Tag.KEEPALIVE2
    _SCHEMA = (("sec", "u32"), ("nsec", "u32"))
    sec: int
    nsec: int


@dataclass(frozen=True, slots=True)
class Keepalive2Ack(ControlFrame):
    TAG: ClassVar[Tag] = Tag.KEEPALIVE2_ACK
    _SCHEMA = (("sec", "u32"), ("nsec", "u32"))
    sec: int
    nsec: int


@dataclass(frozen=True, slots=True)
class Ack(ControlFrame):
    TAG: ClassVar[Tag] = Tag.ACK
    _SCHEMA = (("seq", "u64"),)
    seq: int


CONTROL_TYPES: tuple[type[ControlFrame], ...] = (
    Hello, AuthRequest, AuthBadMethod, AuthReplyMore, AuthRequestMore, AuthDone, AuthSignature,
    ClientIdent, ServerIdent, IdentMissingFeatures, SessionReconnect, SessionReset, SessionRetry,
    SessionRetryGlobal, SessionReconnectOk, Wait, Keepalive2, Keepalive2Ack, Ack)

# A 256-entry list indexed by tag avoids hashing on every control frame.
_BY_TAG: list[type[ControlFrame] | None] = [None] * 256
for _cls in CONTROL_TYPES:
    _BY_TAG[_cls.TAG] = _cls
del _cls


def decode_control(tag: int, payload: Buffer) -> ControlFrame:
    """Decode the payload of a non-MESSAGE frame with tag ``tag``."""
    cls = _BY_TAG[tag] if 0 <= tag < 256 else None
    if cls is None:
        raise RemoteProtocolError(f"tag {tag} is not a control frame", "bad_tag")
    return cls.decode(payload)


def encode_control(obj: ControlFrame) -> list[Buffer]:
    """Buffers of the one-segment frame carrying ``obj`` (``encode_frame(obj.TAG, ...)``)."""
    return encode_frame(obj.TAG, [obj.encode()])
