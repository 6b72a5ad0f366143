"""The admin socket's commands (``msgr status``, ``perf``, ``scale``, ``stop``).

Read-only views of the supervisor's state, plus the two commands that steer it; the
socket itself is :mod:`pool.supervisor.admin`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from protocol.accel import describe as per_message_path
from pool.control.page import RETENTION_FIELDS, ControlPage
from pool.control.states import State
from transport.event_center import EventCenter

from .config import PoolConfig
from .lifecycle import WorkerSlot
from .listener_slots import ListenerSlots
from .listeners import AcceptGroup
from .peer_map import PeerMapPublisher
from .processor import Processor
from .ring_mesh import RingMesh

__all__ = ["AdminCommands", "SupervisorView", "used_slots"]

Command = Callable[[dict[str, Any]], dict[str, Any]]


class SupervisorView(Protocol):
    """What the commands read of the supervisor, and the two ways they steer it."""

    cfg: PoolConfig
    center: EventCenter | None
    page: ControlPage | None
    slots: list[WorkerSlot]
    desired: int
    address: tuple[str, int]
    stopping: bool
    stats: dict[str, int]
    peers: PeerMapPublisher
    mesh: RingMesh | None
    reuseport: ListenerSlots | None
    processor: Processor | None
    accept_loop: AcceptGroup | None

    def set_desired(self, n: int, why: str) -> None: ...

    def begin_stop(self, why: str, code: int = 0) -> None: ...


def used_slots(sup: SupervisorView) -> Iterator[tuple[WorkerSlot, dict[str, int], float | None]]:
    """Each slot that ever ran a worker: its lifecycle, its control-page words, and the
    seconds since its live worker's last heartbeat (None without one)."""
    assert sup.page is not None
    now_ns = time.monotonic_ns()
    for ws in sup.slots:
        if ws.generation == 0 and ws.state is State.EXITED:
            continue
        v = sup.page.slot(ws.slot).snapshot()
        hb = v["heartbeat_ns"]
        yield ws, v, round((now_ns - hb) / 1e9, 3) if hb and ws.pid else None


class AdminCommands:
    def __init__(self, sup: SupervisorView) -> None:
        self.sup = sup

    def table(self) -> dict[str, Command]:
        """What :class:`pool.supervisor.admin.AdminServer` dispatches on."""
        return {"status": self.cmd_status, "perf": self.cmd_perf,
                "scale": self.cmd_scale, "stop": self.cmd_stop}

    def cmd_status(self, _args: dict[str, Any]) -> dict[str, Any]:
        sup = self.sup
        assert sup.page is not None
        workers = []
        for ws, v, hb_age in used_slots(sup):
            workers.append({
                "slot": ws.slot, "pid": ws.pid, "state": ws.state.name,
                "connections": v["connections"] if ws.pid else 0,
                "msgs_in": v["msgs_in"], "msgs_out": v["msgs_out"],
                "bytes_in": v["bytes_in"], "bytes_out": v["bytes_out"],
                **{k: v[k] if ws.pid else 0 for k in RETENTION_FIELDS},
                "restarts": ws.restarts, "generation": ws.generation,
                "heartbeat_age": hb_age,
                "loop_count": v["loop_count"], "last_exit": ws.last_exit,
                "listeners": sup.reuseport.owned_by(ws.slot) if sup.reuseport else [],
            })
        rings = sorted(list(pair) for pair in sup.mesh.rings) if sup.mesh is not None else []
        return {"pid": os.getpid(), "desired": sup.desired, "accept": sup.cfg.accept,
                "bind": list(sup.address), "stopping": sup.stopping,
                "accepting": sum(1 for ws in sup.slots if ws.state is State.ACCEPTING),
                "control_page": sup.page.name, "workers": workers,
                "rings": rings, "peer_map": {"version": sup.peers.version, "slots": sup.peers.slots}}

    def cmd_perf(self, _args: dict[str, Any]) -> dict[str, Any]:
        sup = self.sup
        status = self.cmd_status({})
        keys = ("msgs_in", "msgs_out", "bytes_in", "bytes_out", *RETENTION_FIELDS)
        totals = {k: sum(w[k] for w in status["workers"]) for k in keys}
        # workers are forked from this process with its environment: the same path
        perf: dict[str, Any] = {"totals": totals, "supervisor": dict(sup.stats),
                                "per_message_path": per_message_path()}
        if sup.processor is not None and sup.accept_loop is not None:
            st = sup.accept_loop.statistics()
            perf["processor"] = {"accepted": st.accepted, "assigned": sup.processor.assigned,
                                 "naks": sup.processor.naks, "dropped": sup.processor.dropped,
                                 "backlog": len(sup.processor.backlog), "accept_backoffs": st.backoffs,
                                 "inflight": dict(sup.processor.inflight)}
        cols = ("slot", "state", "connections", "loop_count", *keys)
        perf["workers"] = [{k: w[k] for k in cols} for w in status["workers"]]
        return perf

    def cmd_scale(self, args: dict[str, Any]) -> dict[str, Any]:
        sup = self.sup
        n = args.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= sup.cfg.max_slots:
            raise ValueError(f"n must be an integer 1..{sup.cfg.max_slots}, got {n!r} "
                             "(e.g. {\"cmd\": \"scale\", \"n\": 4})")
        if sup.stopping:
            raise ValueError("the pool is stopping")
        sup.set_desired(n, "admin scale")
        return {"desired": n}

    def cmd_stop(self, _args: dict[str, Any]) -> dict[str, Any]:
        sup = self.sup
        assert sup.center is not None
        sup.center.call_soon(lambda: sup.begin_stop("admin stop"))
        return {"stopping": True, "pid": os.getpid()}
