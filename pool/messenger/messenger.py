"""Messenger: connections, the session registry, policies, throttles and dispatch.

One Messenger lives on one EventCenter (one worker). It owns:

* ``conns`` — the session registry keyed by the peer's advertised address (Ceph's
  ``conns``); a server looks up an existing session here on CLIENT_IDENT and
  SESSION_RECONNECT and applies the decision table in :mod:`protocol.session`;
* the policies per peer entity type, and the receive throttles (messages, bytes);
* dispatch to the registered :class:`~pool.messenger.dispatcher.Dispatcher` objects.

Its knobs are one frozen :class:`~pool.messenger.config.MessengerConfig`. To its
connections it is a :class:`~pool.messenger.owner.ConnectionOwner` and nothing more.

Not thread-safe: call it from its EventCenter's thread, or hop there with
``center.dispatch_event_external``. In the pool, a hook (``route_request``) lets the
worker hand a reconnect for a session owned by another worker to that worker.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import ipaddress
import logging
import random
import secrets
import socket
from collections.abc import Callable
from typing import Any

from protocol import features
from protocol.auth import RefuseServerAuth
from protocol.connection import Config, Connection, IdentRequest, ReconnectRequest, Role
from protocol.ceph.messages import message_name
from protocol.control import EntityAddr
from protocol.identity import IdentityCheck, default_identity_check
from protocol.message import Message
from protocol.policy import Backoff, Policy
from protocol.retention import RetentionLedger
from protocol.session import (
    Decision, Session, Verdict, decide_ident, decide_reconnect, retained_cost,
)
from transport.event_center import EventCenter
from transport.listener import AcceptLoop
from transport.stacks import make_stack
from transport.stack import Address, ConnectedSocket, NetworkStack, ServerSocket, SocketOptions

from .auth import AuthSettings
from .config import MessengerConfig
from .connection import AsyncConnection
from .dispatcher import Dispatcher
from .failure import HandshakeFailure
from .states import ConnState
from .throttle import ReceiveThrottle, throttle_cost

__all__ = ["Messenger"]

log = logging.getLogger("pool.messenger.messenger")

#: route_request(conn, event) -> True when the request was handed to another owner
RouteHook = Callable[[AsyncConnection, "IdentRequest | ReconnectRequest"], bool]


def _addr_entity(addr: Address | None, nonce: int) -> EntityAddr:
    """An entity_addr_t for a stack address: IP literals as they are, host names
    resolved (entity_addr_t carries a sockaddr, not a name), paths as paths."""
    if isinstance(addr, tuple):
        host = str(addr[0])
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host:
                host = str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
        return EntityAddr(nonce, host, int(addr[1]))
    return EntityAddr(nonce, str(addr or ""), 0)


class Messenger:
    """A set of sessions on one EventCenter."""

    def __init__(self, center: EventCenter, config: MessengerConfig | None = None, *,
                 entity_type: int, name: str = "", policy: Policy | None = None,
                 stack: NetworkStack | None = None, auth: AuthSettings | None = None,
                 retained: RetentionLedger[AsyncConnection] | None = None) -> None:
        """``retained``: a ledger shared with other messengers of the worker (one set
        of caps for all), instead of one of ``config.retention``'s own."""
        cfg = self.config = config or MessengerConfig()
        self.center = center
        self.entity_type = entity_type
        self.name = name
        self.stack = stack or make_stack("posix")
        self.stack.bind_center(center)
        self.socket_options = SocketOptions()
        self.default_policy = policy or Policy.lossless_client()
        self.policies: dict[int, Policy] = {}
        self.dispatchers: list[Dispatcher] = []
        self.nonce = cfg.nonce if cfg.nonce is not None else secrets.randbits(32)
        self.my_addr = EntityAddr(self.nonce, "", 0)
        self.rng = random.Random(cfg.seed)
        #: server sessions kept without a connection (STANDBY), bounded by the retention
        #: caps; the client of an evicted one is told as if the standby timeout had passed
        self.retained: RetentionLedger[AsyncConnection] = (
            retained if retained is not None else RetentionLedger(cfg.retention))
        self._global_seq = 0
        self.proto_config = Config(
            entity_type=entity_type, my_addr=self.my_addr,
            features_supported=features.SUPPORTED, features_required=features.REQUIRED,
            limits=cfg.limits, next_global_seq=self._next_global_seq,
            new_cookie=self._new_cookie,
            identity_check=IdentityCheck(cfg.identity_check) if cfg.identity_check is not None
            else default_identity_check(entity_type))
        self.auth = auth or AuthSettings()
        self.auth.apply(self.proto_config)
        self.conns: dict[str, AsyncConnection] = {}
        self.anon: set[AsyncConnection] = set()
        self.accepting: set[AsyncConnection] = set()
        self.listeners: list[ServerSocket] = []
        self._accept_loops: list[AcceptLoop] = []
        self._rx = ReceiveThrottle(center, cfg.throttle_messages, cfg.throttle_bytes)
        self.throttle_msgs = self._rx.messages
        self.throttle_bytes = self._rx.bytes
        self.route_request: RouteHook | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        self.msgs_in = 0
        self.msgs_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._holding: Message | None = None
        self._tick_id: int | None = None
        self._stopped = False
        self._tick_id = center.create_time_event(1.0, self._tick)

    # -- configuration ---------------------------------------------------------------------
    @property
    def backoff(self) -> Backoff:
        return self.config.backoff

    def set_policy(self, entity_type: int, policy: Policy) -> None:
        self.policies[entity_type] = policy

    def policy_for(self, entity_type: int) -> Policy:
        return self.policies.get(entity_type, self.default_policy)

    def add_dispatcher(self, d: Dispatcher) -> None:
        self.dispatchers.append(d)

    def _next_global_seq(self, old: int) -> int:
        self._global_seq = max(self._global_seq, old) + 1
        return self._global_seq

    def _new_cookie(self) -> int:
        tag = self.config.cookie_tag
        if not tag:
            return secrets.randbits(64) or 1
        return (tag << 40) | secrets.randbits(40)

    # -- what a connection asks of its owner (owner.ConnectionOwner) --------------------------
    def dial(self, addr: Address) -> ConnectedSocket:
        return self.stack.connect(addr, self.socket_options)

    def client_wire(self, session: Session, addr: Address) -> Connection:
        return Connection(Role.CLIENT, self.proto_config, session,
                          target_addr=_addr_entity(addr, 0))

    # -- server side -------------------------------------------------------------------------
    def bind(self, addr: Address, opts: SocketOptions | None = None) -> Address:
        """Listen on ``addr`` and accept on this messenger's loop; returns the bound address."""
        server = self.stack.listen(addr, opts or self.socket_options)
        self.listeners.append(server)
        bound = server.address
        self.my_addr = _addr_entity(bound, self.nonce)
        self.proto_config.my_addr = self.my_addr
        # AcceptLoop bounds accepts per wake-up and backs off on EMFILE/ENFILE instead of
        # spinning on a listener that stays readable (supervisors.md 2.3).
        loop = AcceptLoop(self.center, server, self._on_accepted, max_per_wakeup=64,
                          backoff=0.1)
        loop.start()
        self._accept_loops.append(loop)
        return bound

    def _on_accepted(self, sock: ConnectedSocket) -> None:
        self.add_accept(sock)

    def set_address(self, addr: Address) -> None:
        """Advertise ``addr``: the address SERVER_IDENT names. A pool worker serves the
        supervisor's listening address, or ``--advertise`` (a server behind port
        forwarding names the address its clients dial)."""
        self.my_addr = _addr_entity(addr, self.nonce)
        self.proto_config.my_addr = self.my_addr

    def add_accept(self, sock: ConnectedSocket) -> AsyncConnection:
        """Serve a freshly accepted socket (from our listener or handed to us)."""
        if not self.my_addr.port:
            # A pool worker binds nothing itself (the supervisor's listener accepted this
            # socket): learn the address clients dial from the socket's local end.
            local = sock.local_address
            if isinstance(local, tuple):
                self.set_address((str(local[0]), int(local[1])))
        conn = AsyncConnection(self, self.default_policy, peer_addr=sock.peer_address,
                               outgoing=False)
        config = self.proto_config
        cap = self.config.max_connections
        if cap and len(self.connections()) + len(self.accepting) >= cap:
            # At the cap: finish the banner exchange and answer AUTH_REQUEST with -EBUSY,
            # so the client learns why instead of seeing a bare close.
            self.stats["refused_busy"] += 1
            config = dataclasses.replace(config, server_auth=lambda: RefuseServerAuth(
                f"this worker serves its maximum of {cap} connections"))
        wire = Connection(Role.SERVER, config,
                          seen_peer_addr=_addr_entity(sock.peer_address, 0))
        self.accepting.add(conn)
        conn.accept(sock, wire)
        return conn

    def adopt_handshake(self, sock: ConnectedSocket, wire: Connection,
                        event: IdentRequest | ReconnectRequest) -> AsyncConnection:
        """Continue a handshake another worker started, then decide on its request."""
        conn = AsyncConnection(self, self.default_policy, peer_addr=sock.peer_address,
                               outgoing=False)
        self.accepting.add(conn)
        conn.accept(sock, wire)
        if isinstance(event, IdentRequest):
            self.handle_ident(conn, event, routed=True)
        else:
            self.handle_reconnect(conn, event, routed=True)
        return conn

    @staticmethod
    def _registry_key(addr: EntityAddr) -> str:
        """One session per peer messenger (Ceph keys ``conns`` by address): a bound peer
        by host:port, so a restarted peer (new nonce) is recognised by its new client
        cookie; an unbound client by its nonce."""
        return f"{addr.host}:{addr.port}" if addr.port else f"anon/{addr.nonce}"

    @staticmethod
    def _target_key(addr: Address) -> str:
        if isinstance(addr, tuple):
            return f"{addr[0]}:{addr[1]}"
        return str(addr)

    def _request_context(self, conn: AsyncConnection, ev: IdentRequest | ReconnectRequest,
                         routed: bool) -> tuple[Connection, Policy, EntityAddr, str,
                                                AsyncConnection | None] | None:
        """Common start of ident/reconnect handling: route elsewhere, or find the policy,
        the peer's registry key and the existing session (None if routed away)."""
        if not routed and self.route_request is not None and self.route_request(conn, ev):
            return None
        wire = conn.wire
        assert wire is not None
        policy = self.policy_for(ev.peer_type)
        conn.policy = policy
        peer = (ev.ident if isinstance(ev, IdentRequest) else ev.request).addrs[0]
        key = self._registry_key(peer)
        existing = self.conns.get(key)
        return wire, policy, peer, key, (None if existing is conn else existing)

    def handle_ident(self, conn: AsyncConnection, ev: IdentRequest, routed: bool = False) -> None:
        ctx = self._request_context(conn, ev, routed)
        if ctx is None:
            return
        wire, policy, peer, key, existing = ctx
        register = not policy.lossy or policy.register_lossy_clients
        d = decide_ident(existing.view() if existing else None, ev.ident, policy,
                         self.my_addr, peer)
        self.stats[f"ident_{d.verdict.value}"] += 1
        if d.verdict is Verdict.NEW_SESSION:
            if existing is not None:
                existing.close(notify=d.reset_existing)
            self._new_server_session(conn, key if register else None, policy)
        elif d.verdict is Verdict.REUSE:
            assert existing is not None and existing.session is not None
            if d.reset_existing:
                existing.session.reset()
                self.dispatch_remote_reset(existing)
            self._reuse(conn, existing, lambda w, s: w.accept_new_session(s, self._new_cookie()))
        elif d.verdict is Verdict.WAIT:
            if existing is not None:
                existing.send_keepalive()
            wire.reject("wait")
            conn.schedule_flush()
        else:  # STALE
            conn.close(notify=False)

    def _new_server_session(self, conn: AsyncConnection, key: str | None, policy: Policy) -> None:
        wire = conn.wire
        assert wire is not None
        session = Session(policy)
        conn.session = session
        wire.accept_new_session(session, self._new_cookie())
        self.accepting.discard(conn)
        if key is not None:
            conn.key = key
            self.conns[key] = conn
        else:
            self.anon.add(conn)
        conn.server_ready(new_session=True)
        self.dispatch_accept(conn)

    def _reuse(self, conn: AsyncConnection, existing: AsyncConnection,
               answer: Callable[[Connection, Session], None]) -> None:
        """Move ``conn``'s socket into ``existing`` and answer the request there."""
        sock, wire = conn.hand_off()
        assert sock is not None and wire is not None and existing.session is not None
        self.accepting.discard(conn)
        self.retained.release(existing)  # its client is back
        existing.replace_socket(sock, wire)
        answer(wire, existing.session)
        existing.server_ready(new_session=False)

    def handle_reconnect(self, conn: AsyncConnection, ev: ReconnectRequest,
                         routed: bool = False) -> None:
        ctx = self._request_context(conn, ev, routed)
        if ctx is None:
            return
        wire, policy, peer, _key, existing = ctx
        d: Decision = decide_reconnect(existing.view() if existing else None, ev.request,
                                       policy, self.my_addr, peer)
        self.stats[f"reconnect_{d.verdict.value}"] += 1
        if d.verdict is Verdict.REUSE:
            assert existing is not None
            self.stats["sessions_resumed"] += 1
            self._reuse(conn, existing, lambda w, s: w.accept_reconnect(s))
            return
        if d.verdict is Verdict.RESET:
            wire.reject("reset", full=d.full)
        elif d.verdict is Verdict.RETRY:
            wire.reject("retry", value=d.value)
        elif d.verdict is Verdict.RETRY_GLOBAL:
            wire.reject("retry_global", value=d.value)
        elif d.verdict is Verdict.WAIT:
            wire.reject("wait")
        conn.schedule_flush()

    # -- client side ----------------------------------------------------------------------------
    def connect(self, addr: Address, policy: Policy | None = None) -> AsyncConnection:
        """The session to ``addr``: the live one if there is one, else a new one (Ceph's
        ``get_connection``). A messenger has one session per peer; to open several
        independent sessions to one server, use several messengers (they can share an
        EventCenter)."""
        key = self._target_key(addr)
        existing = self.conns.get(key)
        if existing is not None and existing.state is not ConnState.CLOSED:
            return existing
        conn = AsyncConnection(self, policy or self.default_policy, peer_addr=addr, outgoing=True)
        conn.key = key
        self.conns[key] = conn
        conn.start_connect()
        return conn

    get_connection = connect

    def send_message(self, msg: Message, conn: AsyncConnection) -> None:
        conn.send_message(msg)

    def unregister(self, conn: AsyncConnection) -> None:
        if conn.key is not None and self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        self.anon.discard(conn)
        self.accepting.discard(conn)
        self.retained.release(conn)

    # -- sessions kept for absent clients ---------------------------------------------------
    def retain(self, conn: AsyncConnection) -> None:
        """A server connection lost its socket and keeps its session for the client's
        return (STANDBY; also a session migrated here in standby). Its messages are made
        to own their payloads (so no receive buffer stays pinned) and counted; sessions
        over the retention caps are evicted, oldest idle first."""
        s = conn.session
        if conn.outgoing or s is None or conn.state is not ConnState.STANDBY:
            return
        self._evict(self.retained.retain(conn, s.compact(), conn.last_active))

    def retain_more(self, conn: AsyncConnection, msg: Message) -> None:
        """``msg`` was queued on a retained session (its client is away)."""
        if conn in self.retained:
            self._evict(self.retained.grow(conn, retained_cost(msg)))

    def _evict(self, victims: list[AsyncConnection]) -> None:
        for conn in victims:
            log.debug("%r evicted: retention caps %s", conn, self.retained.caps)
            conn.expire()

    def connections(self) -> list[AsyncConnection]:
        return [c for c in list(self.conns.values()) + list(self.anon)
                if c.state is not ConnState.CLOSED]

    # -- throttles and dispatch ------------------------------------------------------------
    def throttle_wait(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` (on the loop, FIFO, once) after the next release of either throttle."""
        self._rx.wait(cb)

    def throttle_cancel(self, cb: Callable[[], None]) -> None:
        self._rx.cancel(cb)

    def deliver(self, conn: AsyncConnection, msg: Message) -> bool:
        """Charge the throttles and dispatch ``msg`` (False, nothing charged: full)."""
        rx = self._rx
        size = 0
        if rx.enabled:
            size = throttle_cost(msg)
            if not rx.take(size):
                return False
        self.msgs_in += 1
        self._holding = None
        if msg.raw:  # a Ceph message: name it (MMonGetMap, MMonSubscribe, ...)
            self.stats[f"ceph_msgs_{message_name(msg.type)}"] += 1
            log.debug("%r: Ceph message %s v%d seq %d", conn, message_name(msg.type),
                      msg.version, msg.seq)
        try:
            for d in self.dispatchers:
                d.ms_dispatch(conn, msg)
        except Exception:  # noqa: BLE001 - a dispatcher bug must not kill the worker
            log.exception("dispatcher raised on %r", msg)
            self.stats["dispatch_errors"] += 1
        if self._holding is not msg and rx.enabled:
            rx.put(size)
        self._holding = None
        return True

    def hold(self, msg: Message) -> Callable[[], None]:
        """Called inside ms_dispatch: keep ``msg`` past the callback. The throttles stay
        charged until the returned function is called (exactly once)."""
        if self._holding is not None or msg is None:
            raise RuntimeError("hold() must be called once, from ms_dispatch for that message")
        self._holding = msg
        rx = self._rx
        if not rx.enabled:
            return lambda: None
        size = throttle_cost(msg)
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            rx.put(size)
        return release

    def _each(self, name: str, conn: AsyncConnection) -> None:
        for d in self.dispatchers:
            try:
                getattr(d, name)(conn)
            except Exception:  # noqa: BLE001
                log.exception("dispatcher %s raised", name)
                self.stats["dispatch_errors"] += 1

    def dispatch_connect(self, conn: AsyncConnection) -> None:
        self._each("ms_handle_connect", conn)

    def dispatch_accept(self, conn: AsyncConnection) -> None:
        self._each("ms_handle_accept", conn)

    def dispatch_reset(self, conn: AsyncConnection) -> None:
        self._each("ms_handle_reset", conn)

    def dispatch_remote_reset(self, conn: AsyncConnection) -> None:
        self._each("ms_handle_remote_reset", conn)

    def dispatch_refused(self, conn: AsyncConnection) -> None:
        self._each("ms_handle_refused", conn)

    def dispatch_error(self, conn: AsyncConnection, failure: HandshakeFailure) -> None:
        for d in self.dispatchers:
            try:
                d.ms_handle_error(conn, failure)
            except Exception:  # noqa: BLE001
                log.exception("dispatcher ms_handle_error raised")
                self.stats["dispatch_errors"] += 1

    # -- timers ---------------------------------------------------------------------------------
    def _tick(self) -> None:
        """Ready and idle timeouts (Ceph's connection tick, notes §5)."""
        self._tick_id = None
        if self._stopped:
            return
        now = self.center.now()
        cfg = self.config
        for conn in list(self.conns.values()) + list(self.accepting) + list(self.anon):
            if conn.state in (ConnState.CONNECTING, ConnState.HANDSHAKE, ConnState.ACCEPTING):
                if now - conn.connect_started >= cfg.ready_timeout:
                    self.stats["ready_timeouts"] += 1
                    conn.fault("not ready within the ready timeout")
            elif conn.state is ConnState.READY and now - conn.last_active > cfg.idle_timeout:
                self.stats["idle_timeouts"] += 1
                conn.fault("idle timeout")
            elif conn.state is ConnState.STANDBY and not conn.outgoing \
                    and now - conn.last_active > cfg.standby_timeout:
                self.stats["standby_reaped"] += 1
                conn.expire()
        period = min(1.0, cfg.idle_timeout / 2, cfg.standby_timeout / 2)
        self._tick_id = self.center.create_time_event(period, self._tick)

    # -- shutdown -------------------------------------------------------------------------------
    def close_listeners(self) -> None:
        """Stop accepting (existing connections are untouched)."""
        for loop in self._accept_loops:
            loop.close()
        self._accept_loops.clear()
        for server in self.listeners:
            server.close()
        self.listeners.clear()

    def shutdown(self) -> None:
        """Close every listener and connection (no reset callbacks)."""
        self._stopped = True
        if self._tick_id is not None:
            self.center.delete_time_event(self._tick_id)
            self._tick_id = None
        self.close_listeners()
        for conn in list(self.conns.values()) + list(self.anon) + list(self.accepting):
            conn.mark_down()

    def count_socket_error(self, err: OSError) -> None:
        """Count resets and refusals apart: scale tests assert there are none."""
        if err.errno == errno.ECONNRESET:
            self.stats["econnreset"] += 1
        elif err.errno == errno.ECONNREFUSED:
            self.stats["econnrefused"] += 1
        elif err.errno == errno.EPIPE:
            self.stats["epipe"] += 1
        else:
            self.stats["socket_errors"] += 1

    def counters(self) -> dict[str, Any]:
        return {**{f"auth_rejected_{k}": v for k, v in self.auth.stats.counts.items()},"msgs_in": self.msgs_in, "msgs_out": self.msgs_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "connections": len(self.connections()),
                "sessions_retained": len(self.retained),
                "retained_bytes": self.retained.total_bytes,
                "sessions_evicted": self.retained.evicted,
                **dict(self.stats)}
