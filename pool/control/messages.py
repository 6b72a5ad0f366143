"""The supervisor<->worker control messages: one typed dataclass per :class:`Kind`.

:mod:`pool.control.channel` moves :class:`Envelope` values (kind, flags, arg, xid, payload,
fds); this module is the only place that knows which field of an envelope means what
for each kind, so the two ends dispatch on types (``handle_<kind>``) and never on raw
header fields. Every field has one meaning: ``xid`` is always the id of a delivery that
is answered, ``arg`` a slot or listener number, and booleans travel in ``flags``.

A message whose fds the kernel dropped (MSG_CTRUNC at RLIMIT_NOFILE) decodes with
``truncated=True`` and no fds, so its receiver can NAK it.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = [
    "FLAG_ADOPTED", "FLAG_RETIRED", "TRUNCATED", "Conn", "ConnAck", "ControlMessage", "Drain",
    "Drained", "Envelope", "Handoff", "HandoffResult", "Kind", "Listen", "Peers", "Ready",
    "RingAdd", "RingDel", "Start", "Started", "Unlisten", "decode", "handler_name",
]

#: ``arg`` of an envelope whose fds could not be received (see module doc)
TRUNCATED = 0xFFFF
#: RING_DEL: the peer retired cleanly (drain what it left), as opposed to crashed
FLAG_RETIRED = 0x01
#: CONN_ACK / HANDOFF_RESULT: the connection was adopted (absent: NAK)
FLAG_ADOPTED = 0x02


class Kind(enum.IntEnum):
    READY = 1  # W->S  the worker's loop and app are up
    START = 2  # S->W  start taking connections (reuseport: the slot's listener fd)
    STARTED = 3  # W->S  it does (the slot becomes ACCEPTING)
    CONN = 4  # S->W  adopt this fd (+ state); xid names the delivery
    CONN_ACK = 5  # W->S  adopted or NAK
    HANDOFF = 6  # W->S  relay this fd (+ state) to another slot
    HANDOFF_RESULT = 7  # S->W  the target adopted it, or did not
    DRAIN = 8  # S->W  retire: migrate connections, then exit
    LISTEN = 9  # S->W  also poll a listener (fd attached)
    UNLISTEN = 10  # S->W  stop polling a listener
    DRAINED = 11  # W->S  owns nothing any more, exiting
    RING_ADD = 12  # S->W  attach ring (JSON descriptor; fds: bell, space eventfds)
    RING_DEL = 13  # S->W  a worker exited: retired (drain its ring) or crashed
    PEERS = 14  # S->W  the peer map (JSON: version, accepting slots, previous, lost)


@dataclass
class Envelope:
    """One reassembled control message as it travels (named apart from
    :class:`protocol.message.Message`, which is what connections carry)."""

    kind: Kind
    arg: int
    xid: int
    payload: bytes
    fds: list[int] = field(default_factory=list)
    flags: int = 0


@dataclass
class ControlMessage:
    """Base of the typed messages; ``fds`` are owned by whoever holds the message."""

    KIND: ClassVar[Kind]

    @property
    def fds(self) -> list[int]:
        return []

    def envelope(self) -> Envelope:
        return Envelope(self.KIND, 0, 0, b"")

    @classmethod
    def from_envelope(cls, env: Envelope) -> ControlMessage:
        return cls()


@dataclass
class _FdCarrier(ControlMessage):
    """A message that may carry fds (the only kind the kernel can truncate)."""

    passed: list[int] = field(default_factory=list)

    @property
    def fds(self) -> list[int]:
        return self.passed


@dataclass
class Ready(ControlMessage):
    KIND: ClassVar[Kind] = Kind.READY
    pid: int = 0

    def envelope(self) -> Envelope:
        return Envelope(self.KIND, 0, 0, json.dumps({"pid": self.pid}).encode())

    @classmethod
    def from_envelope(cls, env: Envelope) -> Ready:
        try:
            return cls(int(json.loads(env.payload)["pid"]))
        except (ValueError, KeyError, TypeError):
            return cls()  # the pid is informational: the supervisor knows it from fork


@dataclass
class Start(_FdCarrier):
    """``listeners[i]`` is the id of the listener whose fd is ``passed[i]`` (reuseport)."""

    KIND: ClassVar[Kind] = Kind.START
    listeners: list[int] = field(default_factory=list)

    def envelope(self) -> Envelope:
        payload = json.dumps(self.listeners).encode() if self.listeners else b""
        return Envelope(self.KIND, 0, 0, payload, list(self.passed))

    @classmethod
    def from_envelope(cls, env: Envelope) -> Start:
        return cls(list(env.fds), [int(x) for x in json.loads(env.payload or b"[]")])


@dataclass
class Started(ControlMessage):
    KIND: ClassVar[Kind] = Kind.STARTED


@dataclass
class Drain(ControlMessage):
    KIND: ClassVar[Kind] = Kind.DRAIN


@dataclass
class Drained(ControlMessage):
    KIND: ClassVar[Kind] = Kind.DRAINED


@dataclass
class _Delivery(_FdCarrier):
    """A connection on its way (CONN, HANDOFF): one fd and the session state blob."""

    xid: int = 0
    meta: bytes = b""
    truncated: bool = False

    def fd(self) -> int | None:
        """The connection's fd, closing any extra ones; None if it did not arrive."""
        if self.truncated or not self.passed:
            for fd in self.passed:
                os.close(fd)
            self.passed = []
            return None
        first, extra = self.passed[0], self.passed[1:]
        for fd in extra:
            os.close(fd)
        self.passed = [first]
        return first


@dataclass
class Conn(_Delivery):
    """S->W: adopt this connection; answered by a :class:`ConnAck` with the same xid."""

    KIND: ClassVar[Kind] = Kind.CONN

    def envelope(self) -> Envelope:
        return Envelope(self.KIND, 0, self.xid, self.meta, list(self.passed))

    @classmethod
    def from_envelope(cls, env: Envelope) -> Conn:
        return cls(list(env.fds), env.xid, env.payload, env.arg == TRUNCATED)


@dataclass
class Handoff(_Delivery):
    """W->S: relay this connection to ``target``; answered by a :class:`HandoffResult`."""

    KIND: ClassVar[Kind] = Kind.HANDOFF
    target: int = 0

    def envelope(self) -> Envelope:
        return Envelope(self.KIND, self.target, self.xid, self.meta, list(self.passed))

    @classmethod
    def from_envelope(cls, env: Envelope) -> Handoff:
        return cls(list(env.fds), env.xid, env.payload, env.arg == TRUNCATED, env.arg)


@dataclass
class _Answer(ControlMessage):
    xid: int = 0
    adopted: bool = False

    def envelope(self) -> Envelope:
        return Envelope(self.KIND, 0, self.xid, b"", flags=FLAG_ADOPTED if self.adopted else 0)

    @classmethod
    def from_envelope(cls, env: Envelope) -> _Answer:
        return cls(env.xid, bool(env.flags & FLAG_ADOPTED))


@dataclass
class ConnAck(_Answer):
    KIND: ClassVar[Kind] = Kind.CONN_ACK


@dataclass
class HandoffResult(_Answer):
    KIND: ClassVar[Kind] = Kind.HANDOFF_RESULT


@dataclass
class Listen(_FdCarrier):
    """S->W: also poll listener ``lid`` (its fd attached)."""

    KIND: ClassVar[Kind] = Kind.LISTEN
    lid: int = 0

    def envelope(self) -> Envelope:
        return Envelope(self.KIND, self.lid, 0, b"", list(self.passed))

    @classmethod
    def from_envelope(cls, env: Envelope) -> Listen:
        return cls(list(env.fds), env.arg)


@dataclass
class Unlisten(ControlMessage):
    KIND: ClassVar[Kind] = Kind.UNLISTEN
    lid: int = 0

    def envelope(self) -> Envelope:
        return Envelope(self.KIND, self.lid, 0, b"")

    @classmethod
    def from_envelope(cls, env: Envelope) -> Unlisten:
        return cls(env.arg)


@dataclass
class RingAdd(_FdCarrier):
    """S->W: attach a ring. ``descriptor`` stays JSON text until the worker attaches it,
    so a malformed one fails there, where it is logged, not in the channel."""

    KIND: ClassVar[Kind] = Kind.RING_ADD
    descriptor: bytes = b""

    def envelope(self) -> Envelope:
        return Envelope(self.KIND, 0, 0, self.descriptor, list(self.passed))

    @classmethod
    def from_envelope(cls, env: Envelope) -> RingAdd:
        return cls(list(env.fds), env.payload)


@dataclass
class RingDel(ControlMessage):
    KIND: ClassVar[Kind] = Kind.RING_DEL
    peer: int = 0
    retired: bool = False

    def envelope(self) -> Envelope:
        return Envelope(self.KIND, self.peer, 0, b"", flags=FLAG_RETIRED if self.retired else 0)

    @classmethod
    def from_envelope(cls, env: Envelope) -> RingDel:
        return cls(env.arg, bool(env.flags & FLAG_RETIRED))


@dataclass
class Peers(ControlMessage):
    """S->W: the versioned peer map (see :class:`pool.worker.app.PeerMap`)."""

    KIND: ClassVar[Kind] = Kind.PEERS
    version: int = 0
    slots: tuple[int, ...] = ()
    prev: tuple[int, ...] = ()
    lost: tuple[int, ...] = ()

    def envelope(self) -> Envelope:
        payload = json.dumps({"v": self.version, "slots": list(self.slots),
                              "prev": list(self.prev), "lost": list(self.lost)}).encode()
        return Envelope(self.KIND, 0, 0, payload)

    @classmethod
    def from_envelope(cls, env: Envelope) -> Peers:
        d = json.loads(env.payload)
        return cls(int(d["v"]), tuple(d["slots"]), tuple(d["prev"]), tuple(d["lost"]))


_TYPES: dict[Kind, type[ControlMessage]] = {
    t.KIND: t for t in (Ready, Start, Started, Conn, ConnAck, Handoff, HandoffResult, Drain,
                        Listen, Unlisten, Drained, RingAdd, RingDel, Peers)
}
assert set(_TYPES) == set(Kind), "every Kind has exactly one message type"


def decode(env: Envelope) -> ControlMessage:
    return _TYPES[env.kind].from_envelope(env)


def handler_name(kind: Kind) -> str:
    """``handle_<kind>``: the method a receiver defines for messages of ``kind``."""
    return f"handle_{kind.name.lower()}"
