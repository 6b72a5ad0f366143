"""``entity_addr_t`` and ``entity_addrvec_t`` as Ceph encodes them with MSG_ADDR2.

entity_addr_t (35 bytes for IPv4; facts in ``notes/msgr2-wire.md``)::

    u8 marker = 1
    ENCODE_START(v1, compat 1): u8 1, u8 1, le32 body length
      le32 type        (0 none, 1 legacy/msgr1, 2 msgr2, 3 any)
      le32 nonce
      le32 sockaddr length (0 for a blank address, 16 IPv4, 28 IPv6)
      le16 family      (only if the length is non-zero)
      sockaddr data    (port BIG-endian, then the address, then zero padding)

entity_addrvec_t: u8 marker = 2, le32 count, then the addrs.

Ceph only knows AF_INET and AF_INET6. asyncmsgr also names Unix-socket and shared-memory
endpoints by a path; those travel as family AF_UNIX (1) with the path bytes, which only
an asyncmsgr peer will ever see (a Ceph peer is reached over TCP).

:class:`EntityAddr` keeps the field order (nonce, host, port) it had before so race
tie-breaks ("lower address wins") stay total and deterministic; ``type`` comes last.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ..errors import LocalProtocolError
from .encoding import Buffer, Decoder, Encoder

__all__ = [
    "ADDRVEC_MARKER",
    "ADDR_MARKER",
    "AF_INET",
    "AF_INET6",
    "AF_UNIX",
    "MAX_ADDRS",
    "TYPE_ANY",
    "TYPE_LEGACY",
    "TYPE_MSGR2",
    "TYPE_NONE",
    "EntityAddr",
    "decode_addr",
    "decode_addrvec",
    "encode_addr",
    "encode_addrvec",
    "parse_addr",
]

TYPE_NONE = 0
TYPE_LEGACY = 1
TYPE_MSGR2 = 2
TYPE_ANY = 3
_TYPE_NAMES = {TYPE_NONE: "none", TYPE_LEGACY: "v1", TYPE_MSGR2: "v2", TYPE_ANY: "any"}

AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10  # Linux value; Ceph puts the sender's native value on the wire

ADDR_MARKER = 1
ADDRVEC_MARKER = 2
MAX_ADDRS = 16
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its NUL

_IN = struct.Struct(">H4s8x")       # port (big-endian), IPv4, zero padding: 14 bytes
_IN6 = struct.Struct(">HI16sI")     # port, flowinfo, IPv6, scope id: 26 bytes


@dataclass(frozen=True, slots=True, order=True)
class EntityAddr:
    """A peer address: nonce, host (IP literal, ``""`` for blank, or a path), port, type."""

    nonce: int
    host: str
    port: int
    type: int = TYPE_MSGR2

    def __str__(self) -> str:
        kind = _TYPE_NAMES.get(self.type, str(self.type))
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{kind}:{host}:{self.port}/{self.nonce}"

    def encode(self) -> bytes:
        """Ceph's entity_addr_t bytes; ``LocalProtocolError`` if a field does not fit."""
        enc = Encoder("EntityAddr")
        encode_addr(enc, self)
        return enc.getvalue()

    @classmethod
    def decode(cls, payload: Buffer) -> EntityAddr:
        """Decode exactly one entity_addr_t (no trailing bytes)."""
        dec = Decoder(payload, "entity_addr_t")
        addr = decode_addr(dec, "addr")
        dec.finish()
        return addr


def _family(host: str, port: int) -> tuple[int, bytes]:
    """(family, packed address) for ``host``; AF_UNIX carries the path bytes. A blank
    host with a port is "every interface" (INADDR_ANY), so the port is not lost."""
    if host == "":
        return (0, b"") if port == 0 else (AF_INET, bytes(4))
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("utf-8")
        if len(raw) > _UNIX_PATH_MAX or "\x00" in host:
            raise LocalProtocolError(
                f"EntityAddr host {host!r} is neither an IP literal nor a path of <= "
                f"{_UNIX_PATH_MAX} bytes: resolve host names before building an address",
                "bad_field") from None
        return AF_UNIX, raw
    return (AF_INET, ip.packed) if ip.version == 4 else (AF_INET6, ip.packed)


def encode_addr(enc: Encoder, addr: EntityAddr) -> None:
    if not isinstance(addr, EntityAddr):
        enc.fail("addr", f"must be an EntityAddr, got {addr!r}")
    if not isinstance(addr.host, str):
        enc.fail("host", f"must be a str, got {addr.host!r}")
    if type(addr.port) is not int or not 0 <= addr.port <= 0xFFFF:
        enc.fail("port", f"must be a u16, got {addr.port!r}")
    family, packed = _family(addr.host, addr.port)
    enc.u8(ADDR_MARKER)
    mark = enc.struct_start(1, 1)
    enc.u32(addr.type, "type").u32(addr.nonce, "nonce")
    if family == 0:
        enc.u32(0, "sockaddr_len")
    elif family == AF_INET:
        enc.u32(2 + _IN.size).u16(AF_INET).raw(_IN.pack(addr.port, packed))
    elif family == AF_INET6:
        enc.u32(2 + _IN6.size).u16(AF_INET6).raw(_IN6.pack(addr.port, 0, packed, 0))
    else:
        # A path endpoint has no port; keep the one we were given in front of the path
        # so an (host, port) pair round-trips even for test-only addresses.
        enc.u32(2 + 2 + len(packed)).u16(AF_UNIX).raw(struct.pack(">H", addr.port) + packed)
    enc.struct_end(mark)


def decode_addr(dec: Decoder, field: str) -> EntityAddr:
    marker = dec.u8(field + ".marker")
    if marker != ADDR_MARKER:
        dec.fail(field, f"marker is {marker}, expected {ADDR_MARKER} (entity_addr_t with "
                        "MSG_ADDR2); legacy msgr1 address encodings are not supported")
    _v, outer = dec.struct_start(field, 1)
    atype = dec.u32(field + ".type")
    if atype > TYPE_ANY:
        dec.fail(field + ".type", f"is {atype}, expected 0..3 (none, v1, v2, any)")
    nonce = dec.u32(field + ".nonce")
    elen = dec.u32(field + ".sockaddr_len")
    host, port = "", 0
    if elen:
        if elen < 2 or elen > 2 + 2 + _UNIX_PATH_MAX:
            dec.fail(field + ".sockaddr_len", f"is {elen}, expected 0, 16, 28 or a path")
        family = dec.u16(field + ".family")
        body = dec.take(elen - 2, field + ".sockaddr")
        if family == AF_INET and elen == 2 + _IN.size:
            port, packed = _IN.unpack(body)
            host = str(ipaddress.IPv4Address(packed))
        elif family == AF_INET6 and elen == 2 + _IN6.size:
            port, _flow, packed6, _scope = _IN6.unpack(body)
            host = str(ipaddress.IPv6Address(packed6))
        elif family == AF_UNIX and elen >= 4:
            port = struct.unpack(">H", body[:2])[0]
            try:
                host = bytes(body[2:]).decode("utf-8")
            except UnicodeDecodeError:
                dec.fail(field + ".path", "is not valid UTF-8")
            if not host:
                dec.fail(field + ".path", "is empty")
        else:
            dec.fail(field + ".family", f"{family} with a {elen}-byte sockaddr is not "
                                        "AF_INET (16), AF_INET6 (28) or a path")
    dec.struct_end(outer)
    return EntityAddr(nonce, host, port, atype)


def encode_addrvec(enc: Encoder, addrs: tuple[EntityAddr, ...] | list[EntityAddr]) -> None:
    if not isinstance(addrs, tuple | list) or len(addrs) > MAX_ADDRS:
        enc.fail("addrvec", f"must be a sequence of <= {MAX_ADDRS} EntityAddr, got {addrs!r}")
    enc.u8(ADDRVEC_MARKER)
    enc.u32(len(addrs), "addrvec.count")
    for a in addrs:
        encode_addr(enc, a)


def decode_addrvec(dec: Decoder, field: str) -> tuple[EntityAddr, ...]:
    marker = dec.u8(field + ".marker")
    if marker != ADDRVEC_MARKER:
        dec.fail(field, f"marker is {marker}, expected {ADDRVEC_MARKER} (entity_addrvec_t)")
    n = dec.count(field + ".count", MAX_ADDRS, min_item=7)
    return tuple(decode_addr(dec, f"{field}[{i}]") for i in range(n))


def parse_addr(text: str, nonce: int = 0) -> EntityAddr:
    """``v2:HOST:PORT`` / ``[v2:HOST:PORT]`` / ``HOST:PORT`` (IPv6 in brackets) to an addr.

    ``ValueError`` with a usable message on anything else (user input, not wire input).
    """
    s = text.strip()
    if s.startswith("[") and s.endswith("]") and s[1:3] in ("v1", "v2"):
        s = s[1:-1]
    atype = TYPE_MSGR2
    if s.startswith("v2:"):
        s = s[3:]
    elif s.startswith("v1:"):
        raise ValueError(f"{text!r} is a msgr1 (v1) address; asyncmsgr speaks msgr2 only: "
                         "use the mon's v2 address (port 3300 by default)")
    host, sep, port_s = s.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError(f"{text!r} is not an address of the form v2:HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = int(port_s)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address (give the mon's IP)") \
            from None
    if not 0 < port <= 0xFFFF:
        raise ValueError(f"{text!r}: port {port} is outside 1..65535")
    return EntityAddr(nonce, host, port, atype)
