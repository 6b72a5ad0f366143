"""The worker's own knobs, typed: what the pool (not the app) reads from ``app_config``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_CAPACITY", "LOOPS", "WorkerConfig"]

DEFAULT_CAPACITY = 1 << 19  # 512 KiB per ring: 12 rings for 4 workers = 6 MiB
#: what a worker's EventCenter can run on (``msgr serve --loop``): its own epoll, or a
#: running asyncio / uvloop loop that apps can also ``await`` on
LOOPS = ("epoll", "asyncio", "uvloop")


@dataclass(frozen=True)
class WorkerConfig:
    """The pool's own knobs that arrive in ``app_config`` (``--app-config JSON``), typed.

    The app still sees the whole ``app_config``; these are the keys the worker and the
    supervisor read for the ring mesh and the loop. Read once, at start-up, with the
    same conversions (and the same errors on a bad value) as before.
    """

    #: bytes per ring (a power of two >= 4096); the supervisor creates the segments
    ring_capacity: int = DEFAULT_CAPACITY
    #: ring busy-poll spins; None: 0 below 8 cores, else 64 (see ``default_ring_spins``)
    ring_spins: int | None = None
    #: submit_to requests in flight per destination, and waiting beyond that
    submit_inflight: int = 256
    submit_queue: int = 8192
    #: after a submit, spin this long for the reply before returning to the loop
    reply_spin_us: float = 0.0
    #: EventCenter idle iterations before pollers fall back to a short wait; None: its default
    poller_idle_spins: int | None = None
    #: the EventCenter driver, one of ``LOOPS``
    loop: str = "epoll"

    def __post_init__(self) -> None:
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, not {self.loop!r}")

    @classmethod
    def from_app_config(cls, cfg: Mapping[str, Any]) -> WorkerConfig:
        spins = cfg.get("ring_spins")
        idle = cfg.get("poller_idle_spins")
        return cls(ring_capacity=int(cfg.get("ring_capacity", DEFAULT_CAPACITY)),
                   ring_spins=None if spins is None else int(spins),
                   submit_inflight=int(cfg.get("submit_inflight", 256)),
                   submit_queue=int(cfg.get("submit_queue", 8192)),
                   reply_spin_us=float(cfg.get("reply_spin_us", 0)),
                   poller_idle_spins=None if idle is None else int(idle),
                   loop=str(cfg.get("loop", "epoll")))

    def spins_for(self, ncpus: int) -> int:
        """Busy-polling needs a free core per spinner (ipc-facts.md): with few cores a
        spinning worker steals the CPU the worker it waits for needs (measured on 2
        cores: cross-worker kv GET p50 4.3 ms spinning vs 0.15 ms blocking at once on
        the doorbell). So below 8 cores the rings register no poller (ring_spins=0):
        the doorbell eventfd alone wakes the loop."""
        if self.ring_spins is not None:
            return self.ring_spins
        return 0 if ncpus < 8 else 64
