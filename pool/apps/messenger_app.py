"""MessengerApp: a Messenger on a worker's loop serving one dispatcher (``--app echo`` and
``--app MODULE:NAME`` naming a :class:`~pool.dispatcher.Dispatcher` run in one).

Other apps compose it rather than subclass it (``pool.apps.kv``): they pass their
dispatcher, and two drain hooks — ``holds_worker()`` (peers still need answers from this
worker: the drain waits) and ``holds_connection(conn)`` (requests of ``conn`` are still in
flight: it moves later). Sessions move between workers through
:class:`~pool.apps.migration.SessionMover`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from protocol.features import EntityType
from protocol.policy import Backoff, Policy
from protocol.retention import DEFAULT_CAPS, RetentionCaps
from transport.stack import ConnectedSocket
from transport.stacks import make_stack

from pool.api import (
    AsyncConnection,
    AuthSettings,
    Dispatcher,
    Messenger,
    MessengerConfig,
    load_keyring,
)
from pool.worker.app import WorkerApp, WorkerContext

from .echo import EchoDispatcher
from .migration import SessionMover, cookie_tag

__all__ = ["DEFAULT_RETENTION", "MessengerApp", "retention_caps"]

#: the retention caps a worker applies unless configured (see protocol.retention)
DEFAULT_RETENTION = DEFAULT_CAPS

_DRAIN_RETRY = 0.05


def _never(*_args: object) -> bool:
    return False


class MessengerApp(WorkerApp):
    """A Messenger on the worker's loop serving one dispatcher."""

    def __init__(self, dispatcher_factory: Callable[[], Dispatcher] = EchoDispatcher,
                 config: Mapping[str, Any] | None = None, *,
                 holds_worker: Callable[[], bool] = _never,
                 holds_connection: Callable[[AsyncConnection], bool] = _never) -> None:
        self.dispatcher_factory = dispatcher_factory
        self.config = dict(config or {})
        #: drain hooks (see the module doc): the drain waits while ``holds_worker()``;
        #: a connection moves only once ``holds_connection(conn)`` is False
        self.holds_worker = holds_worker
        self.holds_connection = holds_connection
        self.ctx: WorkerContext | None = None
        self.msgr: Messenger | None = None
        self.mover: SessionMover | None = None
        self.draining = False
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
        self.mover = SessionMover(ctx, msgr, self.holds_connection)
        msgr.route_request = self.mover.route
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
        assert self.mover is not None
        return self.mover.adopt(conn, meta)

    def connection_count(self) -> int:
        return sum(len(m.connections()) for m in (self.msgr, self.local) if m is not None)

    def throttle_counters(self) -> tuple[int, int, int]:
        held_m = held_b = refusals = 0
        for m in (self.msgr, self.local):
            if m is not None:
                held_m += m.throttle_msgs.current
                held_b += m.throttle_bytes.current
                refusals += m.throttle_msgs.refused + m.throttle_bytes.refused
        return held_m, held_b, refusals

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

    # -- draining ------------------------------------------------------------------------------
    def _drain_step(self) -> None:
        ctx, msgr, mover = self.ctx, self.msgr, self.mover
        assert ctx is not None and msgr is not None and mover is not None
        if self.holds_worker():
            # The app still answers peers (e.g. kv requests forwarded to us): wait.
            ctx.center.create_time_event(_DRAIN_RETRY, self._drain_step)
            return
        msgr.close_listeners()
        if self.local is not None:
            # memif/rdma connections cannot move to another process: they end here, and
            # their lossless clients are told (reset) when they reconnect elsewhere.
            self.local.shutdown()
            self.local = None
        if not mover.step():
            ctx.drained()
            return
        ctx.center.create_time_event(_DRAIN_RETRY, self._drain_step)


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
