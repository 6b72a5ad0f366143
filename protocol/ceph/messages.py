"""Typed bodies of the Ceph messages asyncmsgr sends to and understands from a mon.

A Ceph message is a type number, a header ``version``/``compat_version`` and three
bodies: front, middle and data (``notes/msgr2-wire.md``, "MESSAGE"). Each class here
knows its type, the header version it encodes, and how to turn itself into those three
bodies and back. Decoders are strict (:mod:`protocol.ceph.encoding`): a truncated or
corrupt front is a ``RemoteProtocolError`` naming the message and field; a front longer
than the fields this version knows is accepted only when the header says the sender is
newer (``version`` above ours), which is how Ceph appends fields.

:data:`MESSAGE_NAMES` names the types a MonClient sends first, so a server can log what
a real Ceph client asked for even though it does not implement a monitor.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import ClassVar, Self

from ..errors import RemoteProtocolError
from .encoding import Buffer, Decoder, Encoder

__all__ = [
    "MESSAGE_NAMES",
    "MSG_MON_COMMAND",
    "MSG_MON_COMMAND_ACK",
    "MSG_MON_GET_VERSION",
    "MSG_MON_GET_VERSION_REPLY",
    "MSG_MON_SUBSCRIBE",
    "MSG_PING",
    "CephBody",
    "MMonCommand",
    "MMonCommandAck",
    "MMonGetVersion",
    "MMonGetVersionReply",
    "MMonSubscribe",
    "MPing",
    "PaxosHeader",
    "message_name",
]

MSG_PING = 2
MSG_MON_MAP = 4
MSG_MON_GET_MAP = 5
MSG_MON_SUBSCRIBE = 15
MSG_MON_SUBSCRIBE_ACK = 16
MSG_AUTH = 17
MSG_AUTH_REPLY = 18
MSG_MON_GET_VERSION = 19
MSG_MON_GET_VERSION_REPLY = 20
MSG_MON_COMMAND = 50
MSG_MON_COMMAND_ACK = 51
MSG_CONFIG = 62
MSG_GET_CONFIG = 63

#: Ceph message type numbers (``CEPH_MSG_*`` / ``MSG_*``) that a mon client meets first.
MESSAGE_NAMES: dict[int, str] = {
    MSG_PING: "MPing",
    MSG_MON_MAP: "MMonMap",
    MSG_MON_GET_MAP: "MMonGetMap",
    MSG_MON_SUBSCRIBE: "MMonSubscribe",
    MSG_MON_SUBSCRIBE_ACK: "MMonSubscribeAck",
    MSG_AUTH: "MAuth",
    MSG_AUTH_REPLY: "MAuthReply",
    MSG_MON_GET_VERSION: "MMonGetVersion",
    MSG_MON_GET_VERSION_REPLY: "MMonGetVersionReply",
    MSG_MON_COMMAND: "MMonCommand",
    MSG_MON_COMMAND_ACK: "MMonCommandAck",
    MSG_CONFIG: "MConfig",
    MSG_GET_CONFIG: "MGetConfig",
}

_MAX_CMDS = 64
_MAX_JSON = 4 * 1024 * 1024


def message_name(mtype: int) -> str:
    """``"MPing"`` for 2, ``"type 0x1234"`` for a type this table does not name."""
    return MESSAGE_NAMES.get(mtype, f"type {mtype:#06x}")


class CephBody:
    """Base of the typed message bodies. Subclasses are frozen dataclasses."""

    __slots__ = ()
    TYPE: ClassVar[int]
    VERSION: ClassVar[int] = 1
    COMPAT: ClassVar[int] = 1

    def encode(self) -> tuple[bytes, bytes, bytes]:
        """(front, middle, data)."""
        raise NotImplementedError

    @classmethod
    def decode(cls, front: Buffer, middle: Buffer = b"", data: Buffer = b"",
               version: int = 1) -> Self:
        raise NotImplementedError

    @classmethod
    def _decoder(cls, front: Buffer) -> Decoder:
        return Decoder(front, f"{cls.__name__} front")

    @classmethod
    def _finish(cls, dec: Decoder, version: int) -> None:
        # Newer senders append fields (and say so with a higher header version).
        if version <= cls.VERSION:
            dec.finish()


@dataclass(frozen=True, slots=True)
class PaxosHeader:
    """``PaxosServiceMessage`` prefix of mon service messages: le64 version,
    le16 deprecated_session_mon (-1), le64 tid."""

    version: int = 0
    session_mon: int = -1
    tid: int = 0

    def encode_into(self, enc: Encoder) -> None:
        enc.u64(self.version, "paxos.version").i16(self.session_mon, "paxos.session_mon")
        enc.u64(self.tid, "paxos.tid")

    @classmethod
    def decode_from(cls, dec: Decoder) -> PaxosHeader:
        return cls(dec.u64("paxos.version"), dec.i16("paxos.session_mon"), dec.u64("paxos.tid"))


@dataclass(frozen=True, slots=True)
class MPing(CephBody):
    """CEPH_MSG_PING. Empty to send; a mon's reply carries its health and status as one
    le32-length JSON string (``status``)."""

    TYPE: ClassVar[int] = MSG_PING
    status: str = ""

    def encode(self) -> tuple[bytes, bytes, bytes]:
        if not self.status:
            return (b"", b"", b"")
        return (Encoder("MPing").string(self.status, "status").getvalue(), b"", b"")

    @classmethod
    def decode(cls, front: Buffer, middle: Buffer = b"", data: Buffer = b"",
               version: int = 1) -> MPing:
        if not len(front):
            return cls()
        dec = cls._decoder(front)
        status = dec.string("status", _MAX_JSON)
        cls._finish(dec, version)
        return cls(status)


@dataclass(frozen=True, slots=True)
class MMonGetVersion(CephBody):
    """CEPH_MSG_MON_GET_VERSION: le64 handle, string what ("osdmap", "mdsmap", ...)."""

    TYPE: ClassVar[int] = MSG_MON_GET_VERSION
    handle: int
    what: str

    def encode(self) -> tuple[bytes, bytes, bytes]:
        enc = Encoder("MMonGetVersion").u64(self.handle, "handle").string(self.what, "what")
        return (enc.getvalue(), b"", b"")

    @classmethod
    def decode(cls, front: Buffer, middle: Buffer = b"", data: Buffer = b"",
               version: int = 1) -> MMonGetVersion:
        dec = cls._decoder(front)
        out = cls(dec.u64("handle"), dec.string("what", 256))
        cls._finish(dec, version)
        return out


@dataclass(frozen=True, slots=True)
class MMonGetVersionReply(CephBody):
    """CEPH_MSG_MON_GET_VERSION_REPLY (header v2, compat 2): handle, version, oldest."""

    TYPE: ClassVar[int] = MSG_MON_GET_VERSION_REPLY
    VERSION: ClassVar[int] = 2
    COMPAT: ClassVar[int] = 2
    handle: int
    version: int
    oldest_version: int = 0

    def encode(self) -> tuple[bytes, bytes, bytes]:
        enc = Encoder("MMonGetVersionReply").u64(self.handle, "handle")
        enc.u64(self.version, "version").u64(self.oldest_version, "oldest_version")
        return (enc.getvalue(), b"", b"")

    @classmethod
    def decode(cls, front: Buffer, middle: Buffer = b"", data: Buffer = b"",
               version: int = 2) -> MMonGetVersionReply:
        dec = cls._decoder(front)
        handle, ver = dec.u64("handle"), dec.u64("version")
        oldest = dec.u64("oldest_version") if version >= 2 else 0
        cls._finish(dec, version)
        return cls(handle, ver, oldest)


def _cmd_item(dec: Decoder, name: str) -> str:
    return dec.string(name, _MAX_JSON)


def _enc_cmd(enc: Encoder, text: str) -> None:
    enc.string(text, "cmd")


@dataclass(frozen=True, slots=True)
class MMonCommand(CephBody):
    """MSG_MON_COMMAND: paxos header, fsid, vector<string> cmd (JSON); data = input."""

    TYPE: ClassVar[int] = MSG_MON_COMMAND
    fsid: uuid.UUID
    cmd: tuple[str, ...]
    inbl: bytes = b""
    paxos: PaxosHeader = field(default_factory=PaxosHeader)

    def encode(self) -> tuple[bytes, bytes, bytes]:
        enc = Encoder("MMonCommand")
        self.paxos.encode_into(enc)
        enc.uuid(self.fsid, "fsid").vector(self.cmd, _enc_cmd, "cmd")
        return (enc.getvalue(), b"", bytes(self.inbl))

    @classmethod
    def decode(cls, front: Buffer, middle: Buffer = b"", data: Buffer = b"",
               version: int = 1) -> MMonCommand:
        dec = cls._decoder(front)
        paxos = PaxosHeader.decode_from(dec)
        fsid = dec.uuid("fsid")
        cmd = tuple(dec.vector("cmd", _cmd_item, _MAX_CMDS, min_item=4))
        cls._finish(dec, version)
        return cls(fsid, cmd, bytes(data), paxos)


@dataclass(frozen=True, slots=True)
class MMonCommandAck(CephBody):
    """MSG_MON_COMMAND_ACK: paxos header, le32 r, string rs, vector<string> cmd; data =
    the command's output (JSON for ``"format": "json"``)."""

    TYPE: ClassVar[int] = MSG_MON_COMMAND_ACK
    r: int
    rs: str
    cmd: tuple[str, ...] = ()
    outbl: bytes = b""
    paxos: PaxosHeader = field(default_factory=PaxosHeader)

    def encode(self) -> tuple[bytes, bytes, bytes]:
        enc = Encoder("MMonCommandAck")
        self.paxos.encode_into(enc)
        enc.i32(self.r, "r").string(self.rs, "rs").vector(self.cmd, _enc_cmd, "cmd")
        return (enc.getvalue(), b"", bytes(self.outbl))

    @classmethod
    def decode(cls, front: Buffer, middle: Buffer = b"", data: Buffer = b"",
               version: int = 1) -> MMonCommandAck:
        dec = cls._decoder(front)
        paxos = PaxosHeader.decode_from(dec)
        r = dec.i32("r")
        rs = dec.string("rs", _MAX_JSON)
        cmd = tuple(dec.vector("cmd", _cmd_item, _MAX_CMDS, min_item=4))
        cls._finish(dec, version)
        return cls(r, rs, cmd, bytes(data), paxos)


def _sub_item(dec: Decoder, name: str) -> tuple[int, int]:
    return (dec.u64(name + ".start"), dec.u8(name + ".flags"))


@dataclass(frozen=True, slots=True)
class MMonSubscribe(CephBody):
    """CEPH_MSG_MON_SUBSCRIBE: map<string, {le64 start, u8 flags}> (what to watch), and
    from header v3 on the client's hostname. Decoded so a server can log it by name."""

    TYPE: ClassVar[int] = MSG_MON_SUBSCRIBE
    VERSION: ClassVar[int] = 3
    what: dict[str, tuple[int, int]]
    hostname: str = ""

    def encode(self) -> tuple[bytes, bytes, bytes]:
        enc = Encoder("MMonSubscribe").count(len(self.what), "what")
        for name, (start, flags) in self.what.items():
            enc.string(name, "what.key").u64(start, "what.start").u8(flags, "what.flags")
        enc.string(self.hostname, "hostname")
        return (enc.getvalue(), b"", b"")

    @classmethod
    def decode(cls, front: Buffer, middle: Buffer = b"", data: Buffer = b"",
               version: int = 3) -> MMonSubscribe:
        if version < 2:
            raise RemoteProtocolError(f"MMonSubscribe header v{version}: only v2 and later "
                                      "(Luminous on) are understood", "bad_encoding")
        dec = cls._decoder(front)
        what = dec.mapping("what", lambda d, n: d.string(n, 256), _sub_item, 64, min_item=13)
        hostname = dec.string("hostname", 256) if version >= 3 else ""
        cls._finish(dec, version)
        return cls(what, hostname)
