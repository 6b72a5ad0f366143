"""The worker process: one EventCenter, one app, one control channel to the supervisor.

Start-up order matters (supervisors.md 2.6, 2.9):

1. Forget the supervisor's signal set-up: a forked child inherits Python's handlers and,
   worse, its ``signal.set_wakeup_fd`` (writes would wake the *supervisor's* loop).
   Ctrl-C reaches the whole foreground process group, so SIGINT is ignored here: the
   supervisor coordinates shutdown.
2. ``PR_SET_PDEATHSIG(SIGKILL)``, then compare ``getppid()`` with the supervisor's pid:
   the parent may have died before the prctl call, and the signal then never comes
   (prctl(2)). EOF on the control channel is the second, independent exit path.
3. After fork, close every inherited fd except stdio and our channel: listeners, other
   workers' channel ends, pending handoff fds and the supervisor's epoll would otherwise
   stay open here (an accepted connection would not close when its owner closes it,
   and epoll registrations must never be shared across processes, epoll(7) Q6).
   The supervisor's Python objects for those fds stay referenced from the fork()
   caller's frames, which this process never returns to, so nothing closes a reused
   fd number later.
4. Build the EventCenter, create the app (a failure exits with ``ExitCode.BOOT_ERROR``
   before READY, which the supervisor's flap guard counts), send READY.

The heartbeat is written by a loop hook, i.e. by the loop itself: a stuck loop is
exactly what must be detected (supervisors.md 2.4). ``run(max_wait=interval)`` makes an
idle loop iterate at least every ``heartbeat_interval``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pool.control.channel import Channel
from pool.control.exit_codes import ExitCode
from pool.control.messages import (
    Conn,
    ConnAck,
    Drain,
    Drained,
    Envelope,
    Handoff,
    HandoffResult,
    Listen,
    Peers,
    Ready,
    RingAdd,
    RingDel,
    Start,
    Started,
    Unlisten,
    decode,
    handler_name,
)
from pool.control.page import (
    RARE_INTERVAL_NS,
    RETENTION_FIELDS,
    RING_FIELDS,
    THROTTLE_FIELDS,
    ControlPage,
    word_index,
)
from pool.control.states import State
from pool.control.titles import PR_SET_PDEATHSIG, prctl, set_title
from transport.event_center import EventCenter
from transport.kernel import fd_stack
from transport.stack import ConnectedSocket, ServerSocket, SocketOptions

from .app import AppFactory, PeerMap, ReplyCallback, WorkerApp, WorkerContext
from .config import WorkerConfig
from .router import Router

__all__ = ["WorkerSpec", "worker_main"]


@dataclass
class WorkerSpec:
    """Everything a worker needs; picklable (with dill, as multiprocess uses) for spawn."""

    slot: int
    generation: int
    page_name: str
    accept: str
    factory: AppFactory
    app_config: dict[str, Any] = field(default_factory=dict)
    heartbeat_interval: float = 0.25
    supervisor_pid: int = 0
    close_inherited: bool = True
    listener_options: SocketOptions = field(default_factory=lambda: SocketOptions(reuseport=True))


def _close_inherited(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        try:
            os.close(fd)
        except OSError:
            pass  # the fd of the listdir itself, already gone


def _stdio_fds() -> set[int]:
    """fds behind sys.stdout/sys.stderr when they are not 1/2 (e.g. a test harness's
    capture files): closing them would make every later log line raise."""
    out = set()
    for stream in (sys.stdout, sys.stderr):
        try:
            out.add(stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass
    return out


def worker_main(spec: WorkerSpec, ctl: socket.socket) -> None:
    """Process entry point (the multiprocess target). Exits with the worker's status."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if spec.supervisor_pid and os.getppid() != spec.supervisor_pid:
        os._exit(1)  # the supervisor died before the prctl: nobody will signal us
    set_title(f"msgr worker {spec.slot}")
    if spec.close_inherited:
        _close_inherited({0, 1, 2, ctl.fileno(), *_stdio_fds()})
    faulthandler.enable()  # SIGABRT from the heartbeat check dumps every thread's stack
    os.environ["MSGR_WORKER_SLOT"] = str(spec.slot)
    sys.exit(Worker(spec, ctl).run())


class _Accepting:
    """A listener this worker polls (reuseport mode)."""

    def __init__(self, worker: Worker, lid: int, fd: int) -> None:
        self.lid = lid
        self.server = worker.stack.adopt_listener(fd, worker.spec.listener_options)
        self.loop = _make_accept_loop(worker.center, self.server, worker.on_accept)

    def close(self) -> None:
        self.loop.close()
        # Our copy only: the supervisor keeps the slot's listener open (supervisors.md 2.1).
        self.server.close()


def _make_accept_loop(center: EventCenter, server: ServerSocket,
                      on_accept: Callable[[ConnectedSocket], None]) -> Any:
    from transport.listener import AcceptLoop

    loop = AcceptLoop(center, server, on_accept, max_per_wakeup=64, backoff=0.1)
    loop.start()
    return loop


class Worker(WorkerContext):
    """The WorkerContext given to the app, and the loop that drives it."""

    def __init__(self, spec: WorkerSpec, ctl: socket.socket) -> None:
        self.spec = spec
        self.slot = spec.slot
        self.generation = spec.generation & 0xFFFF
        self.config: Mapping[str, Any] = dict(spec.app_config)
        self.ctl = ctl
        # Connections and listeners arrive as fds from the supervisor: a stack that can adopt them.
        self.stack = fd_stack()
        self.worker_config = WorkerConfig.from_app_config(self.config)
        self.center = EventCenter(name=f"worker{spec.slot}", driver=self.worker_config.loop,
                                  poller_idle_spins=self.worker_config.poller_idle_spins)
        self.page = ControlPage.attach(spec.page_name)
        self.app: WorkerApp | None = None
        self.channel: Channel | None = None
        self.listeners: dict[int, _Accepting] = {}
        self.pending: dict[int, Callable[[bool], None]] = {}
        self.next_xid = 1
        self.draining = False
        self.exit_code = 0
        self.handoffs_in = 0
        self.handoffs_out = 0
        self._q = self.page.words()
        # Word indices of this slot's fields, computed once: _beat runs every iteration.
        self._w_heartbeat, self._w_loops, self._w_conns = (
            word_index(spec.slot, f) for f in ("heartbeat_ns", "loop_count", "connections"))
        self._w_counters = tuple(word_index(spec.slot, f)
                                 for f in ("msgs_in", "msgs_out", "bytes_in", "bytes_out"))
        self._w_retention = tuple(word_index(spec.slot, f) for f in RETENTION_FIELDS)
        self._w_rare = tuple(word_index(spec.slot, f) for f in (*RING_FIELDS, *THROTTLE_FIELDS))
        self._rare_at = 0
        self._w_handoffs_in = word_index(spec.slot, "handoffs_in")
        self._w_handoffs_out = word_index(spec.slot, "handoffs_out")
        wcfg = self.worker_config
        self.router = Router(self.center, self.slot, self._on_submit, self.log,
                             inflight_limit=wcfg.submit_inflight, queue_limit=wcfg.submit_queue,
                             spins=wcfg.spins_for(len(os.sched_getaffinity(0))),
                             reply_spin=wcfg.reply_spin_us / 1e6)
        self.peers = PeerMap()

    # -- WorkerContext -----------------------------------------------------------------

    def handoff(self, target_slot: int, fd: int, meta: bytes, on_result: Callable[[bool], None]) -> None:
        if self.channel is None or self.channel.closed:
            self.center.call_soon(lambda: on_result(False))
            return
        xid = self.next_xid
        self.next_xid += 1
        self.pending[xid] = on_result
        self.channel.post(Handoff([fd], xid, meta, target=target_slot))

    def accepting_slots(self) -> list[int]:
        page = self.page
        return [i for i in range(page.nslots)
                if i != self.slot and page.slot(i).get("state") == State.ACCEPTING]

    def owner_of(self, slot: int, generation: int) -> int | None:
        page = self.page
        seen = 0
        while 0 <= slot < page.nslots and seen <= page.nslots:
            view = page.slot(slot)
            accepting = view.get("state") == State.ACCEPTING
            if accepting and (generation < 0 or view.get("generation") & 0xFFFF == generation):
                return slot
            nxt = page.redirect(slot)
            if nxt is None or nxt == slot:
                return None
            # Sessions that moved on were adopted by whatever generation ran there then.
            slot, generation = nxt, -1
            seen += 1
        return None

    def submit_to(self, slot: int, payload: bytes, on_reply: ReplyCallback) -> None:
        if slot == self.slot:
            # Loopback: same contract (reply later, exactly once) without a ring.
            self.center.call_soon(lambda: self._on_submit(slot, payload, on_reply))
            return
        self.router.submit(slot, payload, on_reply)

    def peer_map(self) -> PeerMap:
        return self.peers

    def _on_submit(self, src: int, payload: bytes, reply: ReplyCallback) -> None:
        if self.app is None:
            reply(RuntimeError(f"worker {self.slot} has no app"))
            return
        self.app.handle_submit(src, payload, reply)

    def drained(self) -> None:
        if self.channel is not None:
            self.channel.post(Drained())
        self.center.stop()
        self.log("drained: exiting")

    def log(self, msg: str) -> None:
        try:
            sys.stderr.write(f"msgr worker {self.slot} [{os.getpid()}]: {msg}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # a log line must never take the loop down (e.g. stderr closed)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        finally:
            self._cleanup()

    def _run(self) -> int:
        self._beat_boot()
        try:
            app = self.spec.factory()
            app.start(self)
        except Exception:
            self.log("app failed to start:\n" + traceback.format_exc().rstrip())
            return ExitCode.BOOT_ERROR
        self.app = app
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.channel = Channel(self.center, self.ctl, self._on_message, self._on_channel_close)
        self.center.add_loop_hook(self._beat)
        self.channel.post(Ready(os.getpid()))
        self.center.run(max_wait=self.spec.heartbeat_interval)
        return self.exit_code

    def _on_sigterm(self, _sig: int, _frame: object) -> None:
        # Runs on the main thread between bytecodes (Python signal semantics), so calling
        # into the center is safe; stop() also wakes a blocked epoll_wait.
        self.center.stop()

    def _beat_boot(self) -> None:
        self._q[self._w_heartbeat] = time.monotonic_ns()

    def _beat(self) -> None:
        q, app = self._q, self.app
        now = time.monotonic_ns()
        q[self._w_heartbeat] = now
        q[self._w_loops] = self.center.loop_count
        if app is not None:
            q[self._w_conns] = app.connection_count()
            c0, c1, c2, c3 = self._w_counters
            q[c0], q[c1], q[c2], q[c3] = app.counters()
            r0, r1, r2 = self._w_retention
            q[r0], q[r1], q[r2] = app.retention_counters()
            if now - self._rare_at >= RARE_INTERVAL_NS:
                self._rare_at = now
                self._beat_rare(app)

    def _beat_rare(self, app: WorkerApp) -> None:
        # Only metrics read these, so they need not cost a dict walk every iteration.
        st = self.router.stats
        values = (st["sent"], st["served"], st["replies"], st["failed"], st["backlogged"],
                  *app.throttle_counters())
        for w, v in zip(self._w_rare, values):
            self._q[w] = v

    def on_accept(self, conn: ConnectedSocket) -> None:
        if self.app is None or self.draining or not self._adopt(conn, b""):
            conn.close()

    def _adopt(self, conn: ConnectedSocket, meta: bytes) -> bool:
        assert self.app is not None
        try:
            return bool(self.app.adopt(conn, meta))
        except Exception:
            self.log("app.adopt raised:\n" + traceback.format_exc().rstrip())
            return False

    def _on_message(self, env: Envelope) -> None:
        handler = getattr(self, handler_name(env.kind), None)
        if handler is None:
            for fd in env.fds:
                os.close(fd)
            self.log(f"ignoring unexpected {env.kind.name} from the supervisor")
            return
        handler(decode(env))

    # -- control messages from the supervisor, one handler per kind ------------------------

    def handle_conn(self, msg: Conn) -> None:
        ok = False
        fd = msg.fd()
        if fd is not None:
            if self.draining or self.app is None:
                os.close(fd)
            else:
                conn = self.stack.adopt_connection(fd)
                ok = self._adopt(conn, msg.meta)
                if not ok:
                    conn.close()
                elif msg.meta:
                    self.handoffs_in += 1
                    self._q[self._w_handoffs_in] = self.handoffs_in
        # Publish the new count before the ack, so the Processor's next choice sees it.
        self._beat()
        assert self.channel is not None
        self.channel.post(ConnAck(msg.xid, ok))

    def handle_handoff_result(self, msg: HandoffResult) -> None:
        cb = self.pending.pop(msg.xid, None)
        if msg.adopted:
            self.handoffs_out += 1
            self._q[self._w_handoffs_out] = self.handoffs_out
        if cb is not None:
            cb(msg.adopted)

    def handle_start(self, msg: Start) -> None:
        for lid, fd in zip(msg.listeners, msg.fds):
            self._listen(lid, fd)
        assert self.channel is not None
        self.channel.post(Started())

    def handle_listen(self, msg: Listen) -> None:
        for fd in msg.fds:
            self._listen(msg.lid, fd)

    def handle_unlisten(self, msg: Unlisten) -> None:
        acc = self.listeners.pop(msg.lid, None)
        if acc is not None:
            acc.close()

    def handle_drain(self, _msg: Drain) -> None:
        self._drain()

    def handle_ring_add(self, msg: RingAdd) -> None:
        try:
            self.router.add_ring(json.loads(msg.descriptor), list(msg.fds))
        except Exception:
            self.log("cannot attach ring:\n" + traceback.format_exc().rstrip())

    def handle_ring_del(self, msg: RingDel) -> None:
        self.router.drop_peer(msg.peer, retire=msg.retired)

    def handle_peers(self, msg: Peers) -> None:
        self.peers = PeerMap(msg.version, msg.slots, msg.prev, msg.lost)
        if self.app is not None:
            try:
                self.app.on_peer_map(self.peers)
            except Exception:
                self.log("app.on_peer_map raised:\n" + traceback.format_exc().rstrip())

    def _listen(self, lid: int, fd: int) -> None:
        if self.draining:
            os.close(fd)
            return
        old = self.listeners.pop(lid, None)
        if old is not None:
            old.close()
        self.listeners[lid] = _Accepting(self, lid, fd)

    def _drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.log("draining")
        for acc in self.listeners.values():
            acc.close()
        self.listeners.clear()
        assert self.app is not None
        self.app.begin_drain()

    def _on_channel_close(self, reason: str) -> None:
        # The supervisor is gone (or broke the protocol): nobody can route to us any more.
        self.center.stop()
        self.log(f"control channel closed ({reason}): exiting")

    def _cleanup(self) -> None:
        for acc in self.listeners.values():
            acc.close()
        self.listeners.clear()
        if self.app is not None:
            try:
                self.app.stop()
            except Exception:
                self.log("app.stop raised:\n" + traceback.format_exc().rstrip())
        for cb in self.pending.values():
            try:
                cb(False)
            except Exception:
                pass
        self.pending.clear()
        self.router.close()
        if self.channel is not None:
            self.channel.close()
        else:
            self.ctl.close()
        self.page.close()
        self.center.close()
