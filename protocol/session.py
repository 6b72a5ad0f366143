"""Session state that outlives sockets: sequence numbers, acks, replay, and the server's
decision table for CLIENT_IDENT / SESSION_RECONNECT (ceph-asyncmessenger.md §2.3–2.6).

A :class:`Session` belongs to one peer. Sockets come and go underneath it; what it keeps:

* ``out_seq`` / ``in_seq`` — the last sequence number sent / delivered.
* ``sent`` — messages written but not yet acknowledged (lossless policies only). On a
  fault they are *requeued* ahead of everything else with their original sequence numbers
  and replayed after reconnect; the peer tells us (``msg_seq`` of SESSION_RECONNECT /
  RECONNECT_OK) how far it got, and we discard what it already has.
* an out-queue served highest priority first, FIFO within a priority.
* cookies and sequence counters identifying the session across reconnects.

The decision functions at the bottom are pure: the pool's registry supplies a
:class:`SessionView` of the existing session (if any) and gets back a :class:`Decision`.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .control import ClientIdent, EntityAddr, SessionReconnect
from .errors import RemoteProtocolError
from .message import Message, decode_message, message_segments
from .policy import Policy

__all__ = [
    "Session",
    "SessionView",
    "Decision",
    "Verdict",
    "decide_ident",
    "decide_reconnect",
    "addr_key",
    "MESSAGE_OVERHEAD",
    "MAX_STATE_MESSAGES",
    "STATE_VERSION",
    "SessionStateError",
    "retained_cost",
]


#: What one retained message costs beyond its payload and encoded front: the Message
#: object (sys.getsizeof: 104 B), its deque slot, and room for a small decoded front.
MESSAGE_OVERHEAD = 192


def retained_cost(msg: Message) -> int:
    """Make ``msg`` own its payload (see :meth:`Session.compact`); return what keeping it
    costs: payload, encoded front and :data:`MESSAGE_OVERHEAD`."""
    data = msg.data
    if type(data) is not bytes:
        data = msg.data = bytes(data)
    return len(data) + len(msg.encoded_front()) + MESSAGE_OVERHEAD


#: the format of :meth:`Session.export_state`; :meth:`Session.from_state` takes no other
STATE_VERSION = 1
#: most messages (sent + queued) one exported state may carry
MAX_STATE_MESSAGES = 1 << 16
_U64 = 1 << 64
_STATE_INTS = ("out_seq", "in_seq", "client_cookie", "server_cookie", "connect_seq",
               "global_seq", "peer_global_seq", "ack_pending")
_STATE_KEYS = frozenset(("v", *_STATE_INTS, "sent", "queued", "requeued"))


class SessionStateError(ValueError):
    """An exported session state that :meth:`Session.from_state` refuses (it crossed a
    process boundary, so it is checked like any input from outside)."""


def _export_message(msg: Message) -> list[Any]:
    # A message travels as its MESSAGE frame segments (header with seq/ack, front,
    # middle, data) so that import reuses the bounded wire decoder.
    return [msg.raw, *(bytes(seg) for seg in message_segments(msg, msg.seq, msg.ack_seq))]


def _import_message(v: object, where: str) -> Message:
    if not isinstance(v, list) or not 2 <= len(v) <= 5 or type(v[0]) is not bool \
            or not all(type(seg) is bytes for seg in v[1:]):
        raise SessionStateError(f"{where}: a message is [raw: bool, 1 to 4 segments: bytes]")
    raw = v[0]
    try:
        msg = decode_message([memoryview(seg) for seg in v[1:]], asyncmsgr=not raw)
    except RemoteProtocolError as exc:
        raise SessionStateError(f"{where}: {exc.reason}") from exc
    if len(v) == 5:
        msg.data = v[4]  # the bytes object itself, not a view of it
    return msg


def _import_messages(items: list[Any], key: str) -> list[Message]:
    return [_import_message(v, f"session state {key}[{i}]") for i, v in enumerate(items)]


def _check_ascending(msgs: list[Message], what: str) -> None:
    for a, b in zip(msgs, msgs[1:]):
        if b.seq <= a.seq:
            raise SessionStateError(f"session state {what}: seq {b.seq} follows {a.seq}")


def addr_key(addr: EntityAddr) -> tuple[str, int, int]:
    """Total order on addresses used for the race tie-break (lower address wins)."""
    return (addr.host, addr.port, addr.nonce)


class Session:
    """Sequence, queue and identity state of one peer session (no I/O, no clock)."""

    __slots__ = (
        "policy", "out_seq", "in_seq", "sent", "requeued", "_queues", "_prios",
        "client_cookie", "server_cookie", "connect_seq", "global_seq", "peer_global_seq",
        "ack_pending", "duplicates_dropped", "queued_count",
    )

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.out_seq = 0
        self.in_seq = 0
        self.sent: deque[Message] = deque()
        # Requeued messages keep their seq and go out before anything else.
        self.requeued: deque[Message] = deque()
        self._queues: dict[int, deque[Message]] = {}
        self._prios: list[int] = []  # priorities with a non-empty queue, descending
        self.client_cookie = 0
        self.server_cookie = 0
        self.connect_seq = 0
        self.global_seq = 0
        self.peer_global_seq = 0
        self.ack_pending = 0
        self.duplicates_dropped = 0
        self.queued_count = 0

    # -- state across processes -----------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """This session as a plain msgpack-able value (for another process's
        :meth:`from_state`): sequence numbers, cookies, the unacknowledged ``sent`` list
        and the out-queue in sending order (requeued messages first). The policy is not
        part of it: the importer decides it from the peer type."""
        out: dict[str, Any] = {"v": STATE_VERSION}
        for name in _STATE_INTS:
            out[name] = getattr(self, name)
        out["sent"] = [_export_message(m) for m in self.sent]
        out["queued"] = [_export_message(m) for m in self.queued_messages()]
        out["requeued"] = len(self.requeued)
        return out

    @classmethod
    def from_state(cls, policy: Policy, state: object) -> Session:
        """Rebuild a session from :meth:`export_state`'s value. Anything else (wrong
        version, keys or types, out-of-range numbers, malformed messages, too many of
        them, sequence numbers out of order) raises :class:`SessionStateError`."""
        if not isinstance(state, dict) or set(state) != _STATE_KEYS:
            keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise SessionStateError(f"session state must be a map with keys "
                                    f"{sorted(_STATE_KEYS)}, got {keys}")
        if state["v"] != STATE_VERSION:
            raise SessionStateError(f"session state version {state['v']!r}, "
                                    f"this side reads {STATE_VERSION}")
        for name in (*_STATE_INTS, "requeued"):
            n = state[name]
            if type(n) is not int or not 0 <= n < _U64:
                raise SessionStateError(f"session state {name!r} must be an unsigned 64-bit "
                                        f"int, got {n!r:.40}")
        for key in ("sent", "queued"):
            if not isinstance(state[key], list):
                raise SessionStateError(f"session state {key!r} must be a list of messages")
        if len(state["sent"]) + len(state["queued"]) > MAX_STATE_MESSAGES:
            raise SessionStateError(f"session state carries more than {MAX_STATE_MESSAGES} "
                                    "messages")
        sent = _import_messages(state["sent"], "sent")
        queued = _import_messages(state["queued"], "queued")
        nreq = state["requeued"]
        if nreq > len(queued):
            raise SessionStateError(f"session state requeued={nreq} but only {len(queued)} "
                                    "queued messages")
        _check_ascending(sent, "sent")
        _check_ascending(queued[:nreq], "requeued")
        s = cls(policy)
        for name in _STATE_INTS:
            setattr(s, name, state[name])
        s.sent.extend(sent)
        s.requeued.extend(queued[:nreq])
        for m in queued[nreq:]:
            s.queue(m)
        return s

    # -- sending ---------------------------------------------------------------------
    def queue(self, msg: Message) -> None:
        """Append to the out-queue of the message's priority."""
        prio = msg.priority
        q = self._queues.get(prio)
        if q is None:
            q = self._queues[prio] = deque()
        if not q:
            self._prios.append(prio)
            self._prios.sort(reverse=True)
        q.append(msg)
        self.queued_count += 1

    def has_outgoing(self) -> bool:
        return bool(self.requeued) or self.queued_count > 0

    def pop_outgoing(self) -> Message:
        """Next message to write, with ``seq`` and ``ack_seq`` assigned.

        Lossless policies keep it in ``sent`` until the peer acknowledges it.
        """
        if self.requeued:
            msg = self.requeued.popleft()
            self.out_seq = msg.seq
        else:
            prio = self._prios[0]
            q = self._queues[prio]
            msg = q.popleft()
            if not q:
                self._prios.pop(0)
            self.queued_count -= 1
            self.out_seq += 1
            msg.seq = self.out_seq
        msg.ack_seq = self.in_seq
        self.ack_pending = 0
        if not self.policy.lossy:
            self.sent.append(msg)
        return msg

    def take_outgoing(self, limit: int) -> list[Message]:
        """Up to ``limit`` messages to write, in ``pop_outgoing`` order and with its
        bookkeeping. One call per batch: the common case (nothing requeued, one
        priority) numbers the batch in a single loop instead of a call per message."""
        if limit <= 0 or not self.has_outgoing():
            # Nothing taken means nothing carried the ack: ack_pending must survive for
            # the standalone ACK the writer still owes (a limit of 0 used to clear it).
            return []
        if self.requeued or len(self._prios) != 1:
            out: list[Message] = []
            while len(out) < limit and self.has_outgoing():
                out.append(self.pop_outgoing())
            return out
        prio = self._prios[0]
        q = self._queues[prio]
        if len(q) <= limit:
            out = list(q)
            q.clear()
            self._prios.clear()
        else:
            popleft = q.popleft
            out = [popleft() for _ in range(limit)]
        self.queued_count -= len(out)
        seq = self.out_seq
        ack = self.in_seq
        for msg in out:
            seq += 1
            msg.seq = seq
            msg.ack_seq = ack
        self.out_seq = seq
        self.ack_pending = 0
        if not self.policy.lossy:
            self.sent.extend(out)
        return out

    def queued_messages(self) -> Iterator[Message]:
        """Requeued then queued messages in sending order (for state export)."""
        yield from self.requeued
        for prio in self._prios:
            yield from self._queues[prio]

    # -- receiving -------------------------------------------------------------------
    def on_receive(self, seq: int) -> bool:
        """Account for an incoming message; False means a duplicate to drop.

        A gap (``seq > in_seq + 1``) is accepted as Ceph does ("missed message?"): the
        sender numbers messages of a fresh session from 1, so a gap only follows a
        session reset the peer already told us about.
        """
        if seq <= self.in_seq:
            self.duplicates_dropped += 1
            return False
        self.in_seq = seq
        if not self.policy.lossy:
            self.ack_pending += 1
        return True

    def on_ack(self, seq: int) -> int:
        """Drop acknowledged messages from ``sent``; return how many."""
        sent = self.sent
        n = 0
        while sent and sent[0].seq <= seq:
            sent.popleft()
            n += 1
        return n

    # -- faults and reconnects ------------------------------------------------------
    def requeue_sent(self) -> None:
        """Move unacknowledged messages back in front, keeping their sequence numbers."""
        if not self.sent:
            return
        self.sent.extend(self.requeued)
        self.requeued = self.sent
        self.sent = deque()
        self.out_seq = self.requeued[0].seq - 1

    def discard_requeued_up_to(self, seq: int) -> int:
        """The peer has everything up to ``seq``: drop those from the requeued list."""
        rq = self.requeued
        n = 0
        while rq and rq[0].seq <= seq:
            rq.popleft()
            n += 1
        if rq:
            self.out_seq = rq[0].seq - 1
        else:
            self.out_seq = max(self.out_seq, seq)
        return n

    def reset(self) -> list[Message]:
        """Forget the session (peer reset or lossy fault); return the messages dropped."""
        dropped = list(self.sent) + list(self.queued_messages())
        self.sent.clear()
        self.requeued.clear()
        self._queues.clear()
        self._prios.clear()
        self.queued_count = 0
        self.out_seq = 0
        self.in_seq = 0
        self.ack_pending = 0
        self.connect_seq = 0
        self.client_cookie = 0
        self.server_cookie = 0
        return dropped

    def unacked_count(self) -> int:
        return len(self.sent) + len(self.requeued) + self.queued_count

    def compact(self) -> int:
        """Make every retained message own its payload; return the bytes retained.

        For a session kept without a connection. A received payload is a view into the
        receive buffer it arrived in (zero copy), and a reply that reuses it (echo) pins
        that whole buffer — 256 KiB — for as long as the reply waits for its ack: that,
        not the payload, was what an abandoned session cost. Copying the payload out lets
        the buffer go. The size counted is payload, encoded front and
        :data:`MESSAGE_OVERHEAD` per message.
        """
        return sum(retained_cost(msg) for q in (self.sent, self.requeued, *self._queues.values())
                   for msg in q)


# -- server-side decisions (ProtocolV2::handle_client_ident / handle_reconnect) -------

class Verdict(enum.Enum):
    NEW_SESSION = "new_session"        # accept as a fresh session (reset existing if set)
    REUSE = "reuse"                    # move this socket into the existing session
    RESET = "reset"                    # SESSION_RESET(full)
    RETRY = "retry"                    # SESSION_RETRY(connect_seq)
    RETRY_GLOBAL = "retry_global"      # SESSION_RETRY_GLOBAL(global_seq)
    WAIT = "wait"                      # the existing connection wins a race
    STALE = "stale"                    # this connection is older than the existing one: drop it


@dataclass(frozen=True, slots=True)
class SessionView:
    """What the decision table needs to know about an existing session."""

    closed: bool
    replacing: bool
    ready_or_standby: bool            # READY, or STANDBY/idle with a session
    connecting: bool                  # our own outgoing attempt is in progress
    lossy: bool
    server_policy: bool
    client_cookie: int
    server_cookie: int
    peer_global_seq: int
    connect_seq: int


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reset_existing: bool = False       # discard the existing session's state first
    full: bool = True                  # for RESET
    value: int = 0                     # connect_seq / global_seq for RETRY(_GLOBAL)
    reason: str = ""


def decide_ident(existing: SessionView | None, ident: ClientIdent, policy: Policy,
                 my_addr: EntityAddr, peer_addr: EntityAddr) -> Decision:
    """CLIENT_IDENT against an existing session for the same peer (notes §2.5, §2.6)."""
    if existing is None or existing.closed:
        return Decision(Verdict.NEW_SESSION, reason="no live session for this peer")
    if existing.replacing:
        return Decision(Verdict.WAIT, reason="existing session is being replaced")
    if existing.peer_global_seq > ident.global_seq:
        return Decision(Verdict.STALE, reason="older than the existing connection")
    if existing.lossy:
        return Decision(Verdict.NEW_SESSION, reset_existing=True, reason="existing is lossy")
    if existing.client_cookie and existing.server_cookie \
            and existing.client_cookie != ident.client_cookie:
        # The peer restarted: its old session is gone.
        return Decision(Verdict.REUSE, reset_existing=policy.resetcheck,
                        reason="peer restarted (new client cookie)")
    if existing.client_cookie == ident.client_cookie:
        return Decision(Verdict.REUSE, reason="handshake interrupted before SERVER_IDENT")
    if existing.ready_or_standby:
        return Decision(Verdict.REUSE, reason="replacing a ready/standby connection")
    # Both sides are connecting to each other: a race.
    if addr_key(peer_addr) < addr_key(my_addr) or existing.server_policy:
        return Decision(Verdict.REUSE, reason="race: incoming wins (lower peer address)")
    return Decision(Verdict.WAIT, reason="race: our outgoing connection wins")


def decide_reconnect(existing: SessionView | None, req: SessionReconnect, policy: Policy,
                     my_addr: EntityAddr, peer_addr: EntityAddr) -> Decision:
    """SESSION_RECONNECT against an existing session (the table in notes §2.5)."""
    if existing is None or existing.closed:
        return Decision(Verdict.RESET, full=True, reason="no session to resume")
    if existing.replacing:
        return Decision(Verdict.RETRY_GLOBAL, value=existing.peer_global_seq,
                        reason="existing session is being replaced")
    if existing.client_cookie != req.client_cookie:
        return Decision(Verdict.RESET, full=policy.resetcheck, reason="client cookie mismatch")
    if existing.server_cookie == 0:
        return Decision(Verdict.RESET, full=False, reason="session never completed")
    if existing.peer_global_seq > req.global_seq:
        return Decision(Verdict.RETRY_GLOBAL, value=existing.peer_global_seq,
                        reason="stale global_seq")
    if existing.connect_seq > req.connect_seq:
        return Decision(Verdict.RETRY, value=existing.connect_seq, reason="stale connect_seq")
    if existing.connect_seq == req.connect_seq and existing.connecting:
        # Reconnect race: the existing (outgoing) connection wins when the peer's address
        # is greater than ours and we are not a server.
        if addr_key(peer_addr) > addr_key(my_addr) and not existing.server_policy:
            return Decision(Verdict.WAIT, reason="reconnect race: existing wins")
    return Decision(Verdict.REUSE, reason="resume")
