"""Sessions across worker processes: reconnect routing, migration on scale-down, adoption.

* A server cookie carries its owner's slot in the top byte (:func:`cookie_tag`). A
  SESSION_RECONNECT that lands on another worker (Processor choice, reuseport hashing) is
  handed — socket, handshake state and the bytes already read — to the owner, which
  resumes the session: the client sees no reset. If the owner is gone the local worker
  answers as Ceph does (RESET), and the client's dispatcher hears
  ``ms_handle_remote_reset``: never silent loss.
* On scale-down a draining worker stops each READY connection at a frame boundary (after
  its pending output is flushed), then hands socket + session (sequence numbers, cookies,
  unacknowledged and queued messages, unparsed bytes) to a surviving worker.

The handoff state (``meta``) is msgpack: ``{"kind": HANDSHAKE, "handshake": ...}`` or
``{"kind": SESSION, "session": Session.export_state(), "stream": ..., ...}``. It crossed a
process boundary, so :meth:`SessionMover.adopt` checks it before anything is registered.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import msgpack

from protocol.connection import Connection, IdentRequest, ReconnectRequest, Role
from protocol.control import EntityAddr
from protocol.policy import Policy
from protocol.session import Session
from transport.stack import ConnectedSocket

from pool.api import AsyncConnection, ConnState, Messenger
from pool.worker.app import WorkerContext

__all__ = ["MAX_META", "SessionMover", "cookie_owner", "cookie_tag"]

_HANDSHAKE, _SESSION = 1, 2
#: what one handoff may carry (the control channel's bound)
MAX_META = 1 << 20
_STANDBY_STREAM: dict[str, Any] = {"global_id": 0, "con_mode": 0, "session_key": b"",
                                   "counters": None, "cipher_pending": b"", "pending": b""}


def cookie_tag(slot: int, generation: int) -> int:
    """Top 24 bits of the server cookies a worker makes: slot+1 and its generation."""
    return ((slot + 1) << 16) | (generation & 0xFFFF)


def cookie_owner(cookie: int) -> tuple[int, int] | None:
    """(slot, generation) a server cookie names; None for cookies made outside a pool."""
    tag = cookie >> 40
    return ((tag >> 16) - 1, tag & 0xFFFF) if tag >> 16 else None


def export_session(conn: AsyncConnection, stream: dict[str, Any],
                   standby: bool = False) -> bytes:
    """The handoff state of a READY (or STANDBY) server connection's session."""
    s = conn.session
    assert s is not None
    packed: bytes = msgpack.packb({
        "kind": _SESSION, "key": conn.key, "peer_type": conn.peer_type,
        "peer_addrs": [a.encode() for a in conn.peer_addrs],
        "session": s.export_state(),
        "stream": stream,
        "standby": standby,
        # how long the client has been away: eviction order (idle longest first) must
        # not restart on the new worker
        "idle": max(0.0, conn.center.now() - conn.last_active),
    }, use_bin_type=True)
    return packed


def _decode_meta(meta: bytes) -> dict[str, Any]:
    """The handoff state, checked for shape (the session itself by Session.from_state)."""
    if len(meta) > MAX_META:
        raise ValueError(f"handoff state of {len(meta)} bytes, limit {MAX_META}")
    state = msgpack.unpackb(meta, raw=False)
    if not isinstance(state, dict) or state.get("kind") not in (_HANDSHAKE, _SESSION):
        raise ValueError("handoff state is not a map with kind 1 (handshake) or 2 (session)")
    if state["kind"] == _HANDSHAKE:
        if not isinstance(state.get("handshake"), dict):
            raise ValueError("handoff state: handshake must be a map")
        return state
    checks: dict[str, Callable[[Any], bool]] = {
        "key": lambda v: v is None or isinstance(v, str),
        "peer_type": lambda v: type(v) is int,
        "peer_addrs": lambda v: isinstance(v, list) and len(v) <= 16
        and all(isinstance(a, bytes) for a in v),
        "stream": lambda v: isinstance(v, dict),
        "standby": lambda v: type(v) is bool,
        "idle": lambda v: type(v) in (int, float) and v >= 0,
    }
    for name, ok in checks.items():
        if name not in state or not ok(state[name]):
            raise ValueError(f"handoff state: bad or missing {name!r}")
    return state


class SessionMover:
    """Moves this worker's sessions to others and takes theirs (one per Messenger app).

    ``holds_connection(conn)``: the app still owes ``conn`` answers; it moves only once
    that is False (a reply arriving after the move would go to a dead object).
    """

    def __init__(self, ctx: WorkerContext, msgr: Messenger,
                 holds_connection: Callable[[AsyncConnection], bool]) -> None:
        self.ctx = ctx
        self.msgr = msgr
        self.holds_connection = holds_connection
        self.routed = 0
        self.migrated = 0

    # -- adoption ------------------------------------------------------------------------
    def adopt(self, sock: ConnectedSocket, meta: bytes) -> bool:
        """Take a handed-off connection: a handshake to finish or a session to resume."""
        state = _decode_meta(meta)
        if state["kind"] == _HANDSHAKE:
            wire, ev = Connection.import_handshake(self.msgr.proto_config, state["handshake"])
            self.msgr.adopt_handshake(sock, wire, ev)
            self.routed += 1
            return True
        self._import_session(sock, state)
        self.migrated += 1
        return True

    def _register_imported(self, session: Session, policy: Policy, state: dict[str, Any],
                           peer_addrs: tuple[EntityAddr, ...], peer_addr: Any
                           ) -> AsyncConnection:
        """An AsyncConnection for a migrated session, replacing any local one for its key."""
        msgr = self.msgr
        conn = AsyncConnection(msgr, policy, peer_addr=peer_addr, outgoing=False)
        conn.session = session
        conn.key = state["key"]
        conn.peer_type = int(state["peer_type"])
        conn.peer_addrs = peer_addrs
        if conn.key:
            old = msgr.conns.get(conn.key)
            if old is not None:
                old.mark_down()
            msgr.conns[conn.key] = conn
        return conn

    def _import_session(self, sock: ConnectedSocket, state: dict[str, Any]) -> None:
        msgr = self.msgr
        policy = msgr.policy_for(int(state["peer_type"]))
        s = Session.from_state(policy, state["session"])
        peer_addrs = tuple(EntityAddr.decode(memoryview(a)) for a in state["peer_addrs"])
        if state["standby"]:
            sock.close()  # the placeholder; the client reconnects to us via the redirect
            s.requeue_sent()
            conn = self._register_imported(s, policy, state, peer_addrs, None)
            conn.adopt_standby()
            conn.last_active = msgr.center.now() - float(state["idle"])
            msgr.retain(conn)  # counts here now, under this worker's caps
            return
        wire = Connection.import_ready(Role.SERVER, msgr.proto_config, s,
                                       int(state["peer_type"]), peer_addrs, state["stream"])
        conn = self._register_imported(s, policy, state, peer_addrs, sock.peer_address)
        conn.adopt_ready(sock, wire)

    # -- reconnect routing -----------------------------------------------------------------
    def route(self, conn: AsyncConnection, ev: IdentRequest | ReconnectRequest) -> bool:
        """``Messenger.route_request``: hand a SESSION_RECONNECT for a session another
        worker owns to that worker."""
        if not isinstance(ev, ReconnectRequest):
            return False
        named = cookie_owner(ev.request.server_cookie)
        if named is None:
            return False
        ctx = self.ctx
        owner = ctx.owner_of(*named)
        if owner is None or owner == ctx.slot:
            return False  # ours, or the owner died with it: answer here (RESET if unknown)
        wire = conn.wire
        sock = conn.sock
        if wire is None or sock is None or not sock.can_detach_fd or conn.pending_output():
            return False
        try:
            state = wire.export_handshake()
        except Exception:  # noqa: BLE001
            return False
        meta = msgpack.packb({"kind": _HANDSHAKE, "handshake": state}, use_bin_type=True)
        sock, _ = conn.hand_off()
        assert sock is not None
        self.msgr.accepting.discard(conn)
        fd = sock.fileno()

        def done(ok: bool) -> None:
            if ok:
                sock.close()
                return
            # The owner refused or died meanwhile: answer here; the session is unknown
            # locally, so the client gets SESSION_RESET and a remote-reset callback.
            new_wire, new_ev = Connection.import_handshake(self.msgr.proto_config, state)
            assert isinstance(new_ev, ReconnectRequest)
            self._answer_locally(sock, new_wire, new_ev)

        ctx.handoff(owner, fd, meta, done)
        return True

    def _answer_locally(self, sock: ConnectedSocket, wire: Connection,
                        ev: ReconnectRequest) -> None:
        msgr = self.msgr
        conn = AsyncConnection(msgr, msgr.default_policy, peer_addr=None, outgoing=False)
        msgr.accepting.add(conn)
        conn.accept(sock, wire)
        msgr.handle_reconnect(conn, ev, routed=True)

    # -- migration on scale-down -------------------------------------------------------------
    def step(self) -> bool:
        """One drain pass over the connections; True while some are still here."""
        msgr = self.msgr
        # Half-done handshakes: close; the client retries and lands on a live worker.
        for conn in list(msgr.accepting):
            conn.mark_down()
        busy = False
        for conn in msgr.connections():
            if conn.migrating:
                busy = True
            elif conn.state is ConnState.READY and conn.sock is not None \
                    and conn.sock.can_detach_fd:
                if conn.pending_output():
                    conn.pause_reading()  # stop at a frame boundary, let output drain
                else:
                    self.migrate(conn)
                busy = True
            elif conn.state is ConnState.STANDBY and conn.session is not None:
                # The client is away (reconnecting): move the session without a socket;
                # its reconnect reaches the new owner through the redirect table.
                self.migrate(conn, standby=True)
                busy = True
            elif conn.sock is None:
                conn.mark_down()
            else:
                busy = True
        return busy or bool(msgr.connections())

    def _target(self) -> int | None:
        """Where this draining worker's sessions go: the slot the supervisor redirected
        ours to (so reconnects carrying our cookies find them), else any accepting one."""
        ctx = self.ctx
        target = ctx.owner_of(ctx.slot, -1)
        if target is not None and target != ctx.slot:
            return target
        slots = ctx.accepting_slots()
        return slots[0] if slots else None

    def migrate(self, conn: AsyncConnection, standby: bool = False) -> None:
        """Hand ``conn``'s socket and session (or, ``standby``, the session alone) to
        another worker; a refusal keeps serving it here."""
        if self.holds_connection(conn):
            if not standby:
                conn.pause_reading()
            return
        target = self._target()
        if target is None:
            return  # nobody to take it yet; retried on the next drain step
        if standby:
            self._migrate_standby(conn, target)
            return
        wire = conn.wire
        assert wire is not None
        conn.pause_reading()
        # Everything READY to write was written (pending_output is empty): encode nothing
        # more on this socket; the new owner continues the stream.
        stream = wire.export_ready()
        meta = export_session(conn, stream)
        if len(meta) > MAX_META:
            # Too much queued to move in one handoff: keep serving a little longer.
            wire.restore_ready(stream)
            conn.resume_reading()
            conn.schedule_flush()
            return
        conn.begin_migration()
        sock = conn.sock
        assert sock is not None
        fd = sock.fileno()

        def done(ok: bool) -> None:
            conn.end_migration()
            if ok:
                self.migrated += 1
                sock_, _wire = conn.hand_off()
                if sock_ is not None:
                    sock_.close()
                self.msgr.unregister(conn)
            elif conn.wire is not None:
                conn.wire.restore_ready(stream)
                conn.resume_reading()
                conn.schedule_flush()

        self.ctx.handoff(target, fd, meta, done)

    def _migrate_standby(self, conn: AsyncConnection, target: int) -> None:
        """Hand over a session that has no socket right now. The control channel carries
        exactly one fd per handoff, so a placeholder socket travels with the state."""
        meta = export_session(conn, dict(_STANDBY_STREAM), standby=True)
        if len(meta) > MAX_META:
            conn.mark_down()  # cannot move it; its client will be told on reconnect
            return
        a, b = socket.socketpair()
        conn.begin_migration()

        def done(ok: bool) -> None:
            a.close()
            b.close()
            conn.end_migration()
            if ok:
                self.migrated += 1
                conn.hand_off()
                self.msgr.unregister(conn)

        self.ctx.handoff(target, a.fileno(), meta, done)
