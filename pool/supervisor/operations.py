"""What operators plug into a running pool: Prometheus metrics and systemd's readiness.

The arbiter calls :meth:`Operations.tick` once per loop iteration; everything here is
derived from the supervisor's state at that moment, so the arbiter needs no other hook:

* ``READY=1`` once the desired number of workers accept (first start, and again after
  each ``RELOADING=1``), with a ``STATUS=`` line whenever the counts change;
* ``RELOADING=1`` when the desired count changes (``msgr scale``, SIGTTIN/SIGTTOU);
* ``STOPPING=1`` as soon as the pool begins to stop;
* ``WATCHDOG=1`` from a timer on the supervisor's own loop, so a stuck loop stops
  pinging and systemd's watchdog fires, which is what it is for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pool.control.states import State

from .admin_commands import SupervisorView, used_slots
from .systemd import Notifier, watchdog_interval

if TYPE_CHECKING:
    from .metrics import MetricsServer

__all__ = ["Operations", "pool_snapshot"]

Snapshot = dict[str, Any]


def pool_snapshot(sup: SupervisorView) -> Snapshot:
    """Plain data for :class:`pool.supervisor.metrics.PoolCollector`; runs on the
    supervisor's loop."""
    from .metrics import GAUGES  # imported by then: only the collector asks for this
    workers = []
    for ws, words, hb_age in used_slots(sup):
        row: dict[str, Any] = dict(words)
        # Counters stay readable after an exit (they go back to 0 at the next spawn);
        # levels (connections, retained sessions, held throttles) are 0 without a process.
        for k in GAUGES:
            row[k] = row[k] if ws.pid else 0
        row.update(slot=ws.slot, state=ws.state.name, restarts=ws.restarts, heartbeat_age=hb_age)
        workers.append(row)
    snap: Snapshot = {
        "workers": workers, "desired": sup.desired,
        "accepting": sum(1 for ws in sup.slots if ws.state is State.ACCEPTING),
        "supervisor": dict(sup.stats), "processor": None}
    if sup.processor is not None and sup.accept_loop is not None:
        st = sup.accept_loop.statistics()
        snap["processor"] = {"accepted": st.accepted, "assigned": sup.processor.assigned,
                             "naks": sup.processor.naks, "dropped": sup.processor.dropped,
                             "backlog": len(sup.processor.backlog), "accept_backoffs": st.backoffs}
    return snap


class Operations:
    """Owns the metrics server, the notifier and the watchdog timer of one supervisor."""

    def __init__(self, sup: SupervisorView, metrics: tuple[str, int] | None,
                 log: Callable[[str], None], notifier: Notifier | None = None) -> None:
        self.sup = sup
        self.log = log
        self.notifier = notifier if notifier is not None else Notifier()
        self.metrics: MetricsServer | None = None
        self._metrics_addr = metrics
        self._ready = False
        self._stopping = False
        self._desired = sup.desired
        self._status = ""
        self._watchdog: float | None = None
        self._timer: int | None = None

    def start(self) -> None:
        assert self.sup.center is not None
        if self._metrics_addr is not None:
            # Imported only when asked for: workers are forked from this process, and
            # every module object here is a page their garbage collector may copy.
            from .metrics import MetricsServer, PoolCollector

            collector = PoolCollector(self.sup.center, lambda: pool_snapshot(self.sup))
            self.metrics = MetricsServer(self._metrics_addr, collector)
            self.log(f"metrics: http://{self.metrics.address[0]}:{self.metrics.address[1]}/metrics")
        if self.notifier.enabled:
            self._watchdog = watchdog_interval()
            if self._watchdog is not None:
                self.log(f"systemd watchdog: WATCHDOG=1 every {self._watchdog:.3f}s")
                self._ping()

    def threads(self) -> int:
        """Threads this object runs (the arbiter's fork warning discounts them)."""
        return 1 if self.metrics is not None else 0

    def _ping(self) -> None:
        assert self.sup.center is not None and self._watchdog is not None
        self.notifier.notify("WATCHDOG=1")
        self._timer = self.sup.center.create_time_event(self._watchdog, self._ping)

    def tick(self) -> None:
        """Called by the arbiter every iteration: send what changed to systemd."""
        if not self.notifier.enabled:
            return
        sup = self.sup
        if sup.stopping:
            if not self._stopping:
                self._stopping = True
                self.notifier.notify("STOPPING=1", "STATUS=stopping: draining workers")
            return
        accepting = sum(1 for ws in sup.slots if ws.state is State.ACCEPTING)
        if sup.desired != self._desired:
            self._desired = sup.desired
            if self._ready:
                self._ready = False
                self.notifier.notify("RELOADING=1", self.notifier.monotonic_usec(),
                                     f"STATUS=scaling to {sup.desired} workers ({accepting} accepting)")
        status = f"STATUS={accepting}/{sup.desired} workers accepting on {sup.address[0]}:{sup.address[1]}"
        lines = [status] if status != self._status else []
        self._status = status
        if not self._ready and accepting >= sup.desired:
            self._ready = True
            lines.insert(0, "READY=1")
        if lines:
            self.notifier.notify(*lines)

    def close(self) -> None:
        if self._timer is not None and self.sup.center is not None:
            self.sup.center.delete_time_event(self._timer)
            self._timer = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.notifier.close()
