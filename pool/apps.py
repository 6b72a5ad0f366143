"""Apps a pool can serve, and the Messenger-backed WorkerApp they run in.

``msgr serve --app echo`` (replies to every message with the same type, front and data),
``--app kv`` (the sharded key-value store) or ``--app MODULE:NAME`` naming a
:class:`~pool.messenger.dispatcher.Dispatcher` subclass (run inside a :class:`MessengerApp`) or a
:class:`~pool.app.WorkerApp` factory.

Sessions across processes (DESIGN.md, Processes):

* A server cookie carries its owner's slot in the top byte. A SESSION_RECONNECT that lands
  on another worker (Processor choice, reuseport hashing) is handed — socket, handshake
  state and the bytes already read — to the owner, which resumes the session: the client
  sees no reset. If the owner is gone the local worker answers as Ceph does (RESET), and the
  client's dispatcher hears ``ms_handle_remote_reset``: never silent loss.
* On scale-down a draining worker stops each READY connection at a frame boundary (after
  its pending output is flushed), then hands socket + session (sequence numbers, cookies,
  unacknowledged and queued messages, unparsed bytes) to a surviving worker.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, cast

import msgpack

from protocol.connection import Connection, IdentRequest, ReconnectRequest, Role
from protocol.control import EntityAddr
from protocol.features import EntityType
from protocol.message import Message
from protocol.policy import Backoff, Policy
from protocol.retention import DEFAULT_CAPS, RetentionCaps
from protocol.session import Session
from transport.stacks import make_stack
from transport.stack import ConnectedSocket

from .app import AppFactory, WorkerApp, WorkerContext, import_factory
from .messenger.auth import AuthSettings, load_keyring
from .messenger.config import MessengerConfig
from .messenger.connection import AsyncConnection
from .messenger.states import ConnState
from .messenger.dispatcher import Dispatcher
from .messenger.messenger import Messenger

__all__ = ["APPS", "DEFAULT_RETENTION", "EchoDispatcher", "MessengerApp", "load_app",
           "retention_caps"]

#: the retention caps a worker applies unless configured (see protocol.retention)
DEFAULT_RETENTION = DEFAULT_CAPS

log = logging.getLogger("pool.apps")

_HANDSHAKE, _SESSION = 1, 2
_MAX_META = 1 << 20          # what one handoff may carry (the control channel's bound)
_DRAIN_RETRY = 0.05


class EchoDispatcher(Dispatcher):
    """Reply to every message on the same connection with the same type, front and data."""

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        if msg.raw:  # a Ceph message: same bodies and header versions back
            conn.send_message(Message(msg.type, msg.front, msg.data, msg.priority, msg.tid,
                                      raw=True, middle=msg.middle, version=msg.version,
                                      compat_version=msg.compat_version))
        else:
            conn.send_message(Message(msg.type, msg.front, msg.data, msg.priority, msg.tid))


def cookie_tag(slot: int, generation: int) -> int:
    """Top 24 bits of the server cookies a worker makes: slot+1 and its generation."""
    return ((slot + 1) << 16) | (generation & 0xFFFF)


def cookie_owner(cookie: int) -> tuple[int, int] | None:
    """(slot, generation) a server cookie names; None for cookies made outside a pool."""
    tag = cookie >> 40
    return ((tag >> 16) - 1, tag & 0xFFFF) if tag >> 16 else None


def _pack_message(m: Message) -> list[Any]:
    return [m.type, m.priority, m.tid, m.flags, m.seq, m.ack_seq, m.encoded_front(),
            bytes(m.data), m.raw, bytes(m.middle), m.version, m.compat_version]


def _unpack_message(v: list[Any]) -> Message:
    raw = bool(v[8])
    # An empty encoded front of an asyncmsgr message is front=None (the empty segment),
    # not a msgpack value; a Ceph message's front is its raw bytes.
    front = bytes(v[6]) if raw else (
        msgpack.unpackb(v[6], raw=False, strict_map_key=False) if v[6] else None)
    m = Message(int(v[0]), front, data=v[7], priority=int(v[1]), tid=int(v[2]),
                flags=int(v[3]), raw=raw, middle=bytes(v[9]), version=int(v[10]),
                compat_version=int(v[11]))
    m.seq, m.ack_seq = int(v[4]), int(v[5])
    return m


def export_session(conn: AsyncConnection, stream: dict[str, Any],
                   standby: bool = False) -> bytes:
    """Serialize a READY server connection's session for another worker."""
    s = conn.session
    assert s is not None
    packed: bytes = msgpack.packb({
        "kind": _SESSION, "key": conn.key, "peer_type": conn.peer_type,
        "peer_addrs": [a.encode() for a in conn.peer_addrs],
        "out_seq": s.out_seq, "in_seq": s.in_seq, "client_cookie": s.client_cookie,
        "server_cookie": s.server_cookie, "connect_seq": s.connect_seq,
        "global_seq": s.global_seq, "peer_global_seq": s.peer_global_seq,
        "ack_pending": s.ack_pending,
        "sent": [_pack_message(m) for m in s.sent],
        "queued": [_pack_message(m) for m in s.queued_messages()],
        "requeued": len(s.requeued),
        "stream": stream,
        "standby": standby,
        # how long the client has been away: eviction order (idle longest first) must
        # not restart on the new worker
        "idle": max(0.0, conn.center.now() - conn.last_active),
    }, use_bin_type=True)
    return packed


class MessengerApp(WorkerApp):
    """A Messenger on the worker's loop serving one dispatcher."""

    def __init__(self, dispatcher_factory: Callable[[], Dispatcher] = EchoDispatcher,
                 config: Mapping[str, Any] | None = None) -> None:
        self.dispatcher_factory = dispatcher_factory
        self.config = dict(config or {})
        self.ctx: WorkerContext | None = None
        self.msgr: Messenger | None = None
        self.draining = False
        self.routed = 0
        self.migrated = 0
        #: a second Messenger on the same loop for a non-TCP stack (dpdk = memif, rdma):
        #: each worker serves its own endpoint ``<stack_path>.<slot>`` (see module doc)
        self.local: Messenger | None = None

    # -- WorkerApp -----------------------------------------------------------------------
    def start(self, ctx: WorkerContext) -> None:
        cfg = {**self.config, **dict(ctx.config)}
        self.ctx = ctx
        mcfg = messenger_config(cfg, cookie_tag(ctx.slot, ctx.generation))
        msgr = Messenger(ctx.center, mcfg, entity_type=EntityType.OSD,
                         policy=Policy.stateful_server(), auth=_auth_settings(cfg))
        # --advertise: the address SERVER_IDENT names when clients dial a forwarder
        # (docker -p, a Service, HAProxy, a tunnel) instead of our listener
        bind = cfg.get("advertise") or cfg.get("bind")
        if bind:
            msgr.set_address((str(bind[0]), int(bind[1])) if isinstance(bind, (list, tuple))
                             else str(bind))
        msgr.route_request = self._route
        dispatcher = self.dispatcher_factory()
        msgr.add_dispatcher(dispatcher)
        self.msgr = msgr
        stack_name = str(cfg.get("stack", "posix"))
        if stack_name != "posix":
            path = cfg.get("stack_path")
            if not path:
                raise ValueError(f"--stack {stack_name} needs a socket path (--stack-path)")
            stack = make_stack(stack_name, memif_mode=str(cfg.get("memif_mode", "interrupt")))
            local_cfg = MessengerConfig(inject_socket_failures=mcfg.inject_socket_failures,
                                        cookie_tag=mcfg.cookie_tag, seed=mcfg.seed)
            local = Messenger(ctx.center, local_cfg, entity_type=EntityType.OSD,
                              policy=Policy.stateful_server(), stack=stack,
                              auth=_auth_settings(cfg), retained=msgr.retained)
            endpoint = f"{path}.{ctx.slot}"
            try:
                os.unlink(endpoint)  # a stale socket file of a previous worker in this slot
            except FileNotFoundError:
                pass
            local.bind(endpoint)
            local.add_dispatcher(dispatcher)
            self.local = local
            ctx.log(f"serving {stack_name} at {endpoint}")

    def adopt(self, conn: ConnectedSocket, meta: bytes) -> bool:
        msgr = self.msgr
        if msgr is None or self.draining:
            return False
        if not meta:
            msgr.add_accept(conn)
            return True
        state = msgpack.unpackb(meta, raw=False)
        if state["kind"] == _HANDSHAKE:
            wire, ev = Connection.import_handshake(msgr.proto_config, state["handshake"])
            msgr.adopt_handshake(conn, wire, ev)
            self.routed += 1
            return True
        if state["kind"] == _SESSION:
            self._import_session(conn, state)
            self.migrated += 1
            return True
        return False

    def connection_count(self) -> int:
        return sum(len(m.connections()) for m in (self.msgr, self.local) if m is not None)

    def counters(self) -> tuple[int, int, int, int]:
        out = [0, 0, 0, 0]
        for m in (self.msgr, self.local):
            if m is not None:
                out[0] += m.msgs_in
                out[1] += m.msgs_out
                out[2] += m.bytes_in
                out[3] += m.bytes_out
        return (out[0], out[1], out[2], out[3])

    def retention_counters(self) -> tuple[int, int, int]:
        # One ledger for the worker: ``local`` (memif, rdma) shares the TCP messenger's.
        if self.msgr is None:
            return (0, 0, 0)
        led = self.msgr.retained
        return (len(led), led.total_bytes, led.evicted)

    def begin_drain(self) -> None:
        self.draining = True
        self._drain_step()

    def stop(self) -> None:
        for m in (self.msgr, self.local):
            if m is not None:
                m.shutdown()

    # -- reconnect routing ------------------------------------------------------------------
    def _route(self, conn: AsyncConnection, ev: IdentRequest | ReconnectRequest) -> bool:
        """Hand a SESSION_RECONNECT for a session another worker owns to that worker."""
        if not isinstance(ev, ReconnectRequest) or self.ctx is None:
            return False
        named = cookie_owner(ev.request.server_cookie)
        if named is None:
            return False
        owner = self.ctx.owner_of(*named)
        if owner is None or owner == self.ctx.slot:
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
        assert self.msgr is not None
        self.msgr.accepting.discard(conn)
        fd = sock.fileno()

        def done(ok: bool) -> None:
            if ok:
                sock.close()
                return
            # The owner refused or died meanwhile: answer here; the session is unknown
            # locally, so the client gets SESSION_RESET and a remote-reset callback.
            msgr = self.msgr
            if msgr is None:
                sock.close()
                return
            new_wire, new_ev = Connection.import_handshake(msgr.proto_config, state)
            assert isinstance(new_ev, ReconnectRequest)
            self._answer_locally(sock, new_wire, new_ev)

        self.ctx.handoff(owner, fd, meta, done)
        return True

    def _answer_locally(self, sock: ConnectedSocket, wire: Connection,
                        ev: ReconnectRequest) -> None:
        assert self.msgr is not None
        conn = AsyncConnection(self.msgr, self.msgr.default_policy, peer_addr=None,
                               outgoing=False)
        self.msgr.accepting.add(conn)
        conn.accept(sock, wire)
        self.msgr.handle_reconnect(conn, ev, routed=True)

    # -- migration on scale-down -------------------------------------------------------------
    def _drain_step(self) -> None:
        ctx, msgr = self.ctx, self.msgr
        assert ctx is not None and msgr is not None
        msgr.close_listeners()
        if self.local is not None:
            # memif/rdma connections cannot move to another process: they end here, and
            # their lossless clients are told (reset) when they reconnect elsewhere.
            self.local.shutdown()
            self.local = None
        # Half-done handshakes: close; the client retries and lands on a live worker.
        for conn in list(msgr.accepting):
            conn.mark_down()
        busy = False
        for conn in msgr.connections():
            if conn.migrating:
                busy = True
            elif conn.state is ConnState.READY and conn.sock is not None and conn.sock.can_detach_fd:
                if conn.pending_output():
                    conn.pause_reading()  # stop at a frame boundary, let output drain
                else:
                    self._migrate(conn)
                busy = True
            elif conn.state is ConnState.STANDBY and conn.session is not None:
                # The client is away (reconnecting): move the session without a socket;
                # its reconnect reaches the new owner through the redirect table.
                self._migrate(conn, standby=True)
                busy = True
            elif conn.sock is None:
                conn.mark_down()
            else:
                busy = True
        if not busy and not msgr.connections():
            ctx.drained()
            return
        ctx.center.create_time_event(_DRAIN_RETRY, self._drain_step)

    def _migration_target(self) -> int | None:
        """Where this draining worker's sessions go: the slot the supervisor redirected
        ours to (so reconnects carrying our cookies find them), else any accepting one."""
        ctx = self.ctx
        assert ctx is not None
        target = ctx.owner_of(ctx.slot, -1)
        if target is not None and target != ctx.slot:
            return target
        slots = ctx.accepting_slots()
        return slots[0] if slots else None

    def _migrate(self, conn: AsyncConnection, standby: bool = False) -> None:
        ctx, msgr = self.ctx, self.msgr
        assert ctx is not None and msgr is not None
        target = self._migration_target()
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
        if len(meta) > _MAX_META:
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
                sock_, wire_ = conn.hand_off()
                if sock_ is not None:
                    sock_.close()
                msgr.unregister(conn)
            elif conn.wire is not None:
                conn.wire.restore_ready(stream)
                conn.resume_reading()
                conn.schedule_flush()

        ctx.handoff(target, fd, meta, done)

    def _migrate_standby(self, conn: AsyncConnection, target: int) -> None:
        """Hand over a session that has no socket right now. The control channel carries
        exactly one fd per handoff, so a placeholder socket travels with the state."""
        assert self.ctx is not None and self.msgr is not None
        msgr = self.msgr
        meta = export_session(conn, {"global_id": 0, "con_mode": 0, "session_key": b"",
                                     "counters": None, "cipher_pending": b"", "pending": b""},
                              standby=True)
        if len(meta) > _MAX_META:
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
                msgr.unregister(conn)

        self.ctx.handoff(target, a.fileno(), meta, done)

    def _register_imported(self, session: Session, policy: Policy, state: dict[str, Any],
                           peer_addrs: tuple[EntityAddr, ...], peer_addr: Any
                           ) -> AsyncConnection:
        """An AsyncConnection for a migrated session, replacing any local one for its key."""
        msgr = self.msgr
        assert msgr is not None
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
        assert msgr is not None
        policy = msgr.policy_for(int(state["peer_type"]))
        s = Session(policy)
        s.out_seq = int(state["out_seq"])
        s.in_seq = int(state["in_seq"])
        s.client_cookie = int(state["client_cookie"])
        s.server_cookie = int(state["server_cookie"])
        s.connect_seq = int(state["connect_seq"])
        s.global_seq = int(state["global_seq"])
        s.peer_global_seq = int(state["peer_global_seq"])
        s.ack_pending = int(state["ack_pending"])
        for v in state["sent"]:
            s.sent.append(_unpack_message(v))
        queued = [_unpack_message(v) for v in state["queued"]]
        nreq = int(state["requeued"])
        for m in queued[:nreq]:
            s.requeued.append(m)
        for m in queued[nreq:]:
            s.queue(m)
        peer_addrs = tuple(EntityAddr.decode(memoryview(a)) for a in state["peer_addrs"])
        if state.get("standby"):
            sock.close()  # the placeholder; the client reconnects to us via the redirect
            s.requeue_sent()
            conn = self._register_imported(s, policy, state, peer_addrs, None)
            conn.adopt_standby()
            conn.last_active = msgr.center.now() - float(state.get("idle", 0.0))
            msgr.retain(conn)  # counts here now, under this worker's caps
            return
        wire = Connection.import_ready(Role.SERVER, msgr.proto_config, s,
                                       int(state["peer_type"]), peer_addrs, state["stream"])
        conn = self._register_imported(s, policy, state, peer_addrs, sock.peer_address)
        conn.adopt_ready(sock, wire)


def messenger_config(cfg: Mapping[str, Any], tag: int) -> MessengerConfig:
    """The MessengerConfig an app config asks for (the ``msgr serve`` options)."""
    return MessengerConfig(
        inject_socket_failures=int(cfg.get("inject_socket_failures", 0)),
        throttle_messages=int(cfg.get("throttle_messages", 0)),
        throttle_bytes=int(cfg.get("throttle_bytes", 0)),
        backoff=Backoff(0.2, float(cfg.get("max_backoff", 15.0))),
        standby_timeout=float(cfg.get("standby_timeout", 900.0)),
        retention=retention_caps(cfg), cookie_tag=tag, seed=cfg.get("seed"),
        max_connections=int(cfg.get("max_connections", 0)),
        ready_timeout=float(cfg.get("ready_timeout", 10.0)),
        idle_timeout=float(cfg.get("idle_timeout", 900.0)))


def retention_caps(cfg: Mapping[str, Any]) -> RetentionCaps:
    """The retention caps an app config asks for (``msgr serve --max-standby-*``)."""
    return RetentionCaps(
        max_sessions=int(cfg.get("max_standby_sessions", DEFAULT_CAPS.max_sessions)),
        max_session_bytes=int(cfg.get("max_standby_session_bytes",
                                      DEFAULT_CAPS.max_session_bytes)),
        max_total_bytes=int(cfg.get("max_standby_bytes", DEFAULT_CAPS.max_total_bytes)))


def _auth_settings(cfg: Mapping[str, Any]) -> AuthSettings | None:
    if cfg.get("auth", "none") == "none":
        return None
    return AuthSettings(str(cfg["auth"]), str(cfg.get("mode", "crc")),
                        str(cfg.get("name", "osd.0")), load_keyring(str(cfg["keyring"])))


def _dispatcher_app(cls: Callable[[], Dispatcher], config: Mapping[str, Any]) -> WorkerApp:
    return MessengerApp(cls, config)


APPS: dict[str, Callable[[Mapping[str, Any]], AppFactory]] = {
    "echo": lambda cfg: functools.partial(MessengerApp, EchoDispatcher, dict(cfg)),
}


def load_app(spec: str, config: Mapping[str, Any] | None = None) -> AppFactory:
    """Resolve ``--app``: a built-in name or MODULE:NAME (a Dispatcher subclass, run in a
    MessengerApp, or a WorkerApp factory)."""
    cfg = dict(config or {})
    if spec in APPS:
        return APPS[spec](cfg)
    if spec == "kv":
        from .kv import kv_app_factory  # the sharded key-value app (rings issue)
        return kv_app_factory(cfg)
    obj = import_factory(spec)
    if isinstance(obj, type) and issubclass(obj, Dispatcher):
        return functools.partial(_dispatcher_app, obj, cfg)
    return cast(AppFactory, obj)
