"""The supervisor: owns the listeners, the control page, the admin socket and the workers.

Loop shape from gunicorn's arbiter (style-anchors.md §3): signal handlers only enqueue
(and ``signal.set_wakeup_fd`` wakes the EventCenter); each iteration then runs
``handle_<sig>`` for queued signals, reaps, enforces deadlines, and reconciles the
desired count with the slot table. All per-slot decisions go through
:class:`pool.supervisor.lifecycle.WorkerSlot`, whose transitions live in one table.

Facts and choices:

* **Reaping.** Each worker's ``Process.exitcode`` (a ``waitpid(pid, WNOHANG)``), then
  ``waitpid(-1, WNOHANG)`` until it returns 0 (supervisors.md 2.6), so foreign children
  (we may be PID 1 in a container) are reaped too. When that loop reaps a worker we
  store the status in multiprocess's ``Popen.returncode``: it would otherwise keep
  polling a pid we already reaped (and might later signal a recycled pid).
* **Heartbeats** are read from the control page. Boot and steady state have separate
  deadlines; a miss sends SIGABRT (the worker's faulthandler dumps its stack), then
  SIGKILL after ``kill_grace`` (gunicorn ``murder_workers``).
* **reuseport slots**: :mod:`pool.supervisor.listener_slots`.
* **Ring mesh**: :mod:`pool.supervisor.ring_mesh` makes one ring per ordered pair of live
  workers when a worker is spawned (so before it is ACCEPTING), announced to both ends
  (RING_ADD); at a worker's exit its rings are retired (RING_DEL) or, after a crash,
  reset. The versioned peer map (:mod:`pool.supervisor.peer_map`) is sent to every
  worker whenever the ACCEPTING set changes or a worker was lost.
* **No threads before fork** (supervisors.md 2.9): only ``--metrics`` starts threads,
  which never write to stderr nor hold a lock a worker needs (:mod:`.metrics`); logs
  are plain writes to stderr (no logging locks inherited by children).
"""

from __future__ import annotations

import functools
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import multiprocess

from pool.control.channel import Channel
from pool.control.exit_codes import ExitCode, describe_exit
from pool.control.messages import (
    ConnAck,
    ControlMessage,
    Drain,
    Drained,
    Envelope,
    Handoff,
    Ready,
    Start,
    Started,
    decode,
    handler_name,
)
from pool.control.page import ControlPage
from pool.control.titles import set_title
from pool.worker.app import AppFactory
from pool.worker.config import WorkerConfig
from pool.worker.process import WorkerSpec, worker_main
from transport import fdpass, shmname
from transport.event_center import EventCenter
from transport.kernel import fd_stack
from transport.stack import ConnectedSocket, ServerSocket, SocketOptions

from .admin import AdminServer
from .admin_commands import AdminCommands
from .config import PoolConfig
from .handoff import Deliveries
from .lifecycle import LIVE_STATES, Event, FlapGuard, State, WorkerSlot
from .listener_slots import ListenerSlots, check_migrate_req
from .listeners import AcceptGroup, SharedListeners, address_of, adopt_listeners
from .operations import Operations
from .peer_map import PeerMapPublisher
from .processor import Processor
from .ring_mesh import RingMesh
from .signals import SignalQueue

__all__ = ["Supervisor"]


@dataclass
class _Proc:
    """The supervisor's handle on one running worker process."""

    proc: Any
    pid: int
    generation: int
    channel: Channel
    stalled_at: float = 0.0
    deadline: float = 0.0  # drain or stop deadline (0 = none)
    killed: bool = False
    killed_at: float = 0.0


class Supervisor:
    def __init__(self, cfg: PoolConfig, factory: AppFactory, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.factory = factory
        self._log = log
        self.rng = random.Random()
        self.slots = [WorkerSlot(i, backoff=cfg.backoff, flap=FlapGuard(cfg.flap_window, cfg.flap_max))
                      for i in range(cfg.max_slots)]
        self.procs: dict[int, _Proc] = {}
        self.pid2slot: dict[int, int] = {}
        self.desired = cfg.workers
        self.mp = multiprocess.get_context(cfg.start_method)
        self.signals = SignalQueue()
        self.stopping = False
        self.done = False
        self.exit_code = 0
        self.stop_deadline = 0.0
        self.stats = {"spawned": 0, "restarts": 0, "heartbeat_kills": 0, "relayed": 0,
                      "relay_failures": 0, "drain_kills": 0, "reaped_foreign": 0}
        self.deliveries = Deliveries(
            self._channel_of, lambda cb: self.center.call_soon(cb) if self.center is not None else None,
            lambda slot: slot < len(self.slots) and self.slots[slot].state is State.ACCEPTING, self.stats)
        self.center: EventCenter | None = None
        self.page: ControlPage | None = None
        self.admin: AdminServer | None = None
        self.servers: list[ServerSocket] = []  # processor mode
        self.accept_loop: AcceptGroup | None = None
        self.ops = Operations(self, cfg.metrics, self.log)  # metrics, sd_notify, watchdog
        self.processor: Processor | None = None
        self.reuseport: ListenerSlots | None = None
        self.address: tuple[str, int] = cfg.bind
        self._warned_threads = False
        self.mesh: RingMesh | None = None
        self.peers = PeerMapPublisher()

    def log(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)
            return
        ts = time.strftime("%H:%M:%S")
        sys.stderr.write(f"{ts} msgr supervisor [{os.getpid()}]: {msg}\n")
        sys.stderr.flush()

    # -- start / run / teardown ------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; returns the process exit status."""
        set_title("msgr supervisor")
        removed = shmname.sweep_dead()
        if removed:
            self.log(f"removed {len(removed)} segment(s) of dead pools: {', '.join(removed)}")
        self.center = EventCenter(name="supervisor")
        try:
            self.page = ControlPage.create(self.cfg.max_slots)
            self.mesh = RingMesh(WorkerConfig.from_app_config(self.cfg.app_config).ring_capacity)
            self.signals.install(self.center)
            self._setup_listeners()
            self.admin = AdminServer(self.center, self.cfg.admin_path,
                                     AdminCommands(self).table(), log=self.log)
            self.ops.start()
            self.log(f"serving {self.address[0]}:{self.address[1]} accept={self.cfg.accept} "
                     f"workers={self.desired} start={self.cfg.start_method} app={self.cfg.app} "
                     f"admin={self.cfg.admin_path} page={self.page.name}")
            while not self.done:
                self._tick()
                if not self.done:
                    self.center.process_events(0.1)
            return self.exit_code
        finally:
            self._teardown()

    def _setup_listeners(self) -> None:
        assert self.center is not None
        inherited = adopt_listeners(self.cfg.listen_fds)  # systemd's sockets replace --bind
        if self.cfg.accept == "processor":
            self.servers = inherited or [fd_stack().listen(self.cfg.bind, SocketOptions(backlog=1024))]
            self.address = address_of(self.servers[0])
            self.processor = Processor(self.accepting_load, self.deliveries.deliver, self.log)
            self.accept_loop = AcceptGroup(self.center, self.servers, self._on_accept)
            self.accept_loop.start()
        elif inherited:
            self.reuseport = SharedListeners(inherited, self._post, self.log)
            self.address = self.reuseport.address
        else:
            self.reuseport = ListenerSlots(self.cfg.bind, self._post, self.log)
            self.address = self.reuseport.address
            check_migrate_req(self.cfg.set_migrate_req, self.log)

    def _post(self, slot: int, msg: ControlMessage) -> None:
        p = self.procs.get(slot)
        if p is not None:
            p.channel.post(msg)

    def _teardown(self) -> None:
        # Reached on a clean stop and on a supervisor bug alike: leave nothing behind.
        self.ops.close()
        for sl, p in list(self.procs.items()):
            try:
                os.kill(p.pid, signal.SIGKILL)
                os.waitpid(p.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self._forget(sl, p, 0)
        if self.accept_loop is not None:
            self.accept_loop.close()
        if self.processor is not None:
            self.processor.close()
        for server in self.servers:
            server.close()
        if self.reuseport is not None:
            self.reuseport.close()
        if self.mesh is not None:
            self.mesh.close()  # closes every ring segment (memfds: freed with the last fd)
        if self.page is not None:
            self.page.close()
            self.page.unlink()
        self.signals.close()
        if self.admin is not None:
            self.admin.close()  # last: the socket file disappearing means "all gone"
        if self.center is not None:
            self.center.close()
        self.log(f"stopped (exit status {self.exit_code})")

    # -- the arbiter iteration -------------------------------------------------------------

    def _tick(self) -> None:
        for name in self.signals.names():
            getattr(self, f"handle_{name}", lambda: None)()
        self._reap()
        self._enforce_deadlines()
        self._reconcile()
        self._publish_peers()
        self.ops.tick()

    def handle_term(self) -> None:
        self.begin_stop("SIGTERM")

    def handle_int(self) -> None:
        self.begin_stop("SIGINT")

    def handle_ttin(self) -> None:
        self.set_desired(self.desired + 1, "SIGTTIN")

    def handle_ttou(self) -> None:
        self.set_desired(max(1, self.desired - 1), "SIGTTOU")

    def handle_chld(self) -> None:
        pass  # _reap runs every iteration

    def handle_hup(self) -> None:
        self.log("SIGHUP: reload is not supported; ignoring")

    def _reap(self) -> None:
        # multiprocess's Process.start() polls earlier children (``_cleanup``) and so may
        # reap one of our workers before the loop below sees it: ask each Popen first
        # (``exitcode`` is waitpid(pid, WNOHANG), or the status multiprocess cached).
        for tracked, p in list(self.procs.items()):
            code = p.proc.exitcode
            if code is not None:
                self.pid2slot.pop(p.pid, None)
                self._on_exit(tracked, code)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            slot = self.pid2slot.pop(pid, None)
            if slot is None:
                self.stats["reaped_foreign"] += 1
                self.log(f"reaped unknown child {pid} ({describe_exit(code)})")
                continue
            self._on_exit(slot, code)

    def _forget(self, slot: int, p: _Proc, code: int) -> None:
        # Its last words still count (a CONN_ACK, a HANDOFF sent just before exiting),
        # so read them while the slot is still known.
        p.channel.read_available()
        p.channel.close()
        self.procs.pop(slot, None)
        self.pid2slot.pop(p.pid, None)
        if p.proc._popen is not None:  # see "Reaping" in the module doc
            p.proc._popen.returncode = code
        p.proc.close()
        self.deliveries.fail(slot)

    def _on_exit(self, slot: int, code: int) -> None:
        assert self.page is not None
        p = self.procs[slot]
        ws = self.slots[slot]
        was = ws.state
        self._forget(slot, p, code)
        if ws.generation != p.generation:
            return
        delay = ws.exited(code, time.monotonic(), self.rng)
        view = self.page.slot(slot)
        view.set("pid", 0)
        view.set("connections", 0)
        view.set("state", int(ws.state))
        view.set("restarts", ws.restarts)
        tail = f"; restart in {delay:.2f}s" if delay is not None else ""
        if ws.state is State.FAILED:
            tail = f"; {ws.flap.count} deaths before READY within {self.cfg.flap_window:.0f}s: giving up on this slot"
        self.log(f"slot {slot}: pid {p.pid} exited ({describe_exit(code)}); {was.name} -> {ws.state.name}{tail}")
        if delay is not None:
            self.stats["restarts"] += 1
        self._rehome(slot)
        # A drained (or stopping) worker's exit is a retirement: peers consume what it
        # left. Anything else is a crash: reset its rings so peers fail what is in flight.
        self._retire_rings(slot, crashed=not (was in (State.QUIESCED, State.STOPPING) and code == 0))

    def _enforce_deadlines(self) -> None:
        assert self.page is not None
        now = time.monotonic()
        for slot, p in list(self.procs.items()):
            ws = self.slots[slot]
            st = ws.state
            if st in (State.SPAWNING, State.READY, State.ACCEPTING, State.DRAINING, State.QUIESCED):
                if ws.ready_at is None:
                    deadline, what = ws.spawned_at + self.cfg.boot_timeout, "boot"
                else:
                    hb = self.page.slot(slot).get("heartbeat_ns") / 1e9
                    deadline, what = max(hb, ws.ready_at) + self.cfg.heartbeat_timeout, "heartbeat"
                if now > deadline:
                    self._transition(slot, Event.HEARTBEAT_TIMEOUT,
                                     f"missed its {what} deadline by {now - deadline:.2f}s: SIGABRT (stack dump)")
                    self.stats["heartbeat_kills"] += 1
                    p.stalled_at = now
                    self._signal(p, signal.SIGABRT)
                    self._rehome(slot)
                    continue
            if p.killed:
                if now > p.killed_at + 5.0:
                    # SIGKILL cannot be caught, so an unreaped pid this long after it is
                    # a bookkeeping bug (someone else reaped it): never wait forever.
                    self.log(f"slot {slot}: pid {p.pid} gone without an exit status; forgetting it")
                    self.pid2slot.pop(p.pid, None)
                    self._on_exit(slot, -int(signal.SIGKILL))
                continue
            if st is State.STALLED and now > p.stalled_at + self.cfg.kill_grace:
                self.log(f"slot {slot}: pid {p.pid} still alive {self.cfg.kill_grace}s after SIGABRT: SIGKILL")
                self._kill(p)
            elif st in (State.DRAINING, State.QUIESCED) and p.deadline and now > p.deadline:
                self.stats["drain_kills"] += 1
                self.log(f"slot {slot}: pid {p.pid} did not finish draining in {self.cfg.drain_timeout}s: SIGKILL")
                self._kill(p)
            elif st is State.STOPPING and now > self.stop_deadline:
                self.log(f"slot {slot}: pid {p.pid} did not stop in {self.cfg.graceful_timeout}s: SIGKILL")
                self._kill(p)

    def _signal(self, p: _Proc, sig: int) -> None:
        try:
            os.kill(p.pid, sig)  # p.pid is unreaped (we reap it), so it cannot be recycled
        except ProcessLookupError:
            pass

    def _kill(self, p: _Proc) -> None:
        p.killed = True
        p.killed_at = time.monotonic()
        self._signal(p, signal.SIGKILL)

    def _reconcile(self) -> None:
        if self.stopping:
            if not self.procs:
                self.done = True
            return
        now = time.monotonic()
        for ws in self.slots:
            if ws.state is State.BACKOFF and ws.restart_at is not None and now >= ws.restart_at:
                self._spawn(ws.slot)
        wanted = [ws for ws in self.slots if ws.state in LIVE_STATES or ws.state is State.FAILED]
        if len(wanted) < self.desired:
            free = [ws for ws in self.slots if ws.state is State.EXITED]
            for ws in free[: self.desired - len(wanted)]:
                self._spawn(ws.slot)
        elif len(wanted) > self.desired:
            self._retire(wanted, len(wanted) - self.desired)
        if wanted and not any(ws.state in LIVE_STATES or ws.state in (State.DRAINING, State.QUIESCED)
                              for ws in self.slots):
            self.log("no worker can be kept alive (every wanted slot is FAILED): stopping with status "
                     f"{int(ExitCode.NO_WORKERS)}")
            self.begin_stop("no workers", ExitCode.NO_WORKERS)

    def _retire(self, wanted: list[WorkerSlot], n: int) -> None:
        rank = {State.FAILED: 0, State.BACKOFF: 1, State.SPAWNING: 2, State.READY: 2,
                State.ACCEPTING: 3, State.STALLED: 4}
        accepting = {ws.slot for ws in wanted if ws.state is State.ACCEPTING}
        for ws in sorted(wanted, key=lambda w: (rank[w.state], -w.slot)):
            if n == 0:
                return
            if ws.state in (State.FAILED, State.BACKOFF):
                self._transition(ws.slot, Event.RETIRE, "no longer wanted")
            elif ws.state in (State.SPAWNING, State.READY):
                self._drain(ws.slot)
            elif ws.state is State.ACCEPTING:
                if not accepting - {ws.slot}:
                    return  # keep the last accepting worker until another one is up
                accepting.discard(ws.slot)
                self._drain(ws.slot)
            else:
                continue  # STALLED: it is being killed; retire it once it is BACKOFF
            n -= 1

    def set_desired(self, n: int, why: str) -> None:
        if n != self.desired:
            self.log(f"desired workers {self.desired} -> {n} ({why})")
        self.desired = n
        for ws in self.slots:
            if ws.state is State.FAILED:  # an operator's scale gives failed slots a new chance
                self._transition(ws.slot, Event.RETIRE, "reset by scale")

    def begin_stop(self, why: str, code: int = 0) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.exit_code = code
        self.log(f"stopping ({why}): no new connections; SIGTERM to {len(self.procs)} worker(s)")
        if self.accept_loop is not None:
            self.accept_loop.close()
        if self.processor is not None:
            self.processor.close()
        self.stop_deadline = time.monotonic() + self.cfg.graceful_timeout
        for ws in self.slots:
            if ws.state is State.BACKOFF:
                self._transition(ws.slot, Event.STOP, "pool stopping")
            elif ws.can(Event.STOP):
                self._transition(ws.slot, Event.STOP, "SIGTERM")
                self._signal(self.procs[ws.slot], signal.SIGTERM)

    # -- slots ---------------------------------------------------------------------------

    def _transition(self, slot: int, event: Event, why: str = "") -> None:
        assert self.page is not None
        ws = self.slots[slot]
        was = ws.state
        ws.fire(event)
        self.page.slot(slot).set("state", int(ws.state))
        pid = f" pid {ws.pid}" if ws.pid else ""
        self.log(f"slot {slot}:{pid} {was.name} -> {ws.state.name}" + (f" ({why})" if why else ""))

    def _spawn(self, slot: int) -> None:
        assert self.page is not None and self.center is not None
        ws = self.slots[slot]
        was = ws.state
        if self.cfg.start_method == "fork" and not self._warned_threads \
                and threading.active_count() > 1 + self.ops.threads():
            # A lock held by another thread at fork() stays locked forever in the child
            # (supervisors.md 2.9); we start none, but an imported app module might.
            self._warned_threads = True
            self.log(f"warning: {threading.active_count()} threads run in the supervisor while forking "
                     "workers; if workers hang at start, use --start-method spawn")
        parent, child = fdpass.seqpacket_pair()
        spec = WorkerSpec(slot=slot, generation=ws.generation + 1, page_name=self.page.name,
                          accept=self.cfg.accept, factory=self.factory, app_config=dict(self.cfg.app_config),
                          heartbeat_interval=self.cfg.heartbeat_interval, supervisor_pid=os.getpid(),
                          close_inherited=self.cfg.start_method == "fork")
        view = self.page.slot(slot)
        view.clear()
        # The redirect stays: sessions that migrated away from an earlier generation of
        # this slot still carry its number (and that generation) in their cookies.
        proc = self.mp.Process(target=worker_main, args=(spec, child), name=f"msgr worker {slot}", daemon=True)
        try:
            proc.start()
        finally:
            child.close()  # the child has its copy (inherited by fork, passed by spawn)
        now = time.monotonic()
        ws.spawned(proc.pid, now)
        gen = ws.generation
        # EOF on the channel needs no handler: the reap of the process does the bookkeeping.
        channel = Channel(self.center, parent, functools.partial(self._on_message, slot, gen),
                          lambda _reason: None)
        self.procs[slot] = _Proc(proc, proc.pid, gen, channel)
        self.pid2slot[proc.pid] = slot
        self._add_rings(slot)
        view.set("pid", proc.pid)
        view.set("generation", gen)
        view.set("restarts", ws.restarts)
        view.set("state", int(ws.state))
        self.stats["spawned"] += 1
        self.log(f"slot {slot}: {was.name} -> SPAWNING pid {proc.pid} (generation {gen})")

    def _drain(self, slot: int) -> None:
        assert self.page is not None
        p = self.procs[slot]
        survivors = self.accepting_load()
        survivors.pop(slot, None)
        target = min(survivors, key=lambda s: (survivors[s], s)) if survivors else None
        self.page.set_redirect(slot, target)  # sessions owned by this slot now route there
        self._transition(slot, Event.DRAIN, "scale-down: migrating its connections"
                         + (f", redirect to slot {target}" if target is not None else ""))
        p.deadline = time.monotonic() + self.cfg.drain_timeout
        self._rehome(slot)
        self._publish_peers()  # before DRAIN: the app hands its shards to the new owners
        p.channel.post(Drain())

    def accepting_load(self) -> dict[int, int]:
        assert self.page is not None
        return {ws.slot: self.page.slot(ws.slot).get("connections")
                for ws in self.slots if ws.state is State.ACCEPTING and ws.slot in self.procs}

    # -- messages from workers ---------------------------------------------------------------

    def _on_message(self, slot: int, gen: int, env: Envelope) -> None:
        p = self.procs.get(slot)
        handler = getattr(self, handler_name(env.kind), None)
        if p is None or p.generation != gen or handler is None:
            for fd in env.fds:
                os.close(fd)
            return
        handler(slot, p, decode(env))

    # -- control messages from workers, one handler per kind ---------------------------------

    def handle_conn_ack(self, _slot: int, _p: _Proc, msg: ConnAck) -> None:
        self.deliveries.answered(msg)

    def handle_handoff(self, slot: int, p: _Proc, msg: Handoff) -> None:
        self.deliveries.relay(slot, p.generation, msg)

    def handle_ready(self, slot: int, p: _Proc, _msg: Ready) -> None:
        ws = self.slots[slot]
        if ws.state is not State.SPAWNING:
            return  # retired while booting: it was sent DRAIN already
        now = time.monotonic()
        self._transition(slot, Event.READY, f"{now - ws.spawned_at:.2f}s after spawn")
        ws.ready_at = now
        self._start(slot, p)

    def handle_started(self, slot: int, _p: _Proc, _msg: Started) -> None:
        if self.slots[slot].state is not State.READY:
            return
        self._transition(slot, Event.ACCEPTING)
        self._on_accepting(slot)
        self._publish_peers()

    def handle_drained(self, slot: int, _p: _Proc, _msg: Drained) -> None:
        if self.slots[slot].can(Event.DRAINED):
            self._transition(slot, Event.DRAINED, "owns no connections; exiting")

    # -- ring mesh and peer map --------------------------------------------------------------

    def _add_rings(self, slot: int) -> None:
        if self.mesh is not None:
            self.mesh.connect_worker(slot, [s for s in self.procs if s != slot], self._post, self.log)

    def _retire_rings(self, slot: int, crashed: bool) -> None:
        if self.mesh is None:
            return
        self.mesh.disconnect_worker(slot, crashed, self._post)
        if crashed:
            self.peers.lost(slot)
        self._publish_peers()

    def _publish_peers(self) -> None:
        """Send a new peer map version if the ACCEPTING set changed or a worker died."""
        if self.stopping:
            return
        accepting = sorted(ws.slot for ws in self.slots
                           if ws.state is State.ACCEPTING and ws.slot in self.procs)
        peers = self.peers.update(accepting)
        if peers is None:
            return
        for p in self.procs.values():
            p.channel.post(peers)

    def _start(self, slot: int, p: _Proc) -> None:
        if self.peers.version:
            p.channel.post(self.peers.message())
        p.channel.post(self.reuseport.start_message(slot) if self.reuseport is not None else Start())

    def _on_accepting(self, slot: int) -> None:
        if self.reuseport is not None:
            self.reuseport.on_accepting(slot)
        elif self.processor is not None and self.accept_loop is not None:
            self.processor.kick()
            if not self.processor.backlog and not self.stopping:
                self.accept_loop.resume()

    def _rehome(self, slot: int) -> None:
        if self.reuseport is not None:
            survivors = self.accepting_load()
            survivors.pop(slot, None)
            self.reuseport.rehome(slot, survivors)

    # -- handoff ---------------------------------------------------------------------------

    def _channel_of(self, slot: int, generation: int | None) -> Channel | None:
        p = self.procs.get(slot)
        if p is None or (generation is not None and p.generation != generation):
            return None
        return p.channel

    def _on_accept(self, conn: ConnectedSocket) -> None:
        assert self.processor is not None and self.accept_loop is not None
        fd = conn.detach()
        self.processor.submit(fd)
        if self.processor.backlog:
            # No accepting worker: leave further connections in the kernel's queue.
            self.accept_loop.pause()
