"""What both stress workloads (echo and kv) share: chaos against the pool under test,
the ``--scale-range`` option, latency quantiles."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

from pool.supervisor.admin import AdminClient
from tools.common import NotReady, percentile, wait_status

__all__ = [
    "DEFAULT_MESSAGES",
    "JSON_STDOUT",
    "Chaos",
    "ChaosConfig",
    "ChaosCounts",
    "ChaosTally",
    "p50_p99_us",
    "parse_scale_range",
    "report",
]

#: --messages when it is not given (and, for the echo workload, no --duration either)
DEFAULT_MESSAGES = 10_000


def parse_scale_range(text: str) -> tuple[int, int] | None:
    """``MIN-MAX`` (1 <= MIN <= MAX), or None."""
    lo, _, hi = text.partition("-")
    if not (lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi)):
        return None
    return int(lo), int(hi)


def p50_p99_us(latencies_ns: list[int]) -> tuple[float, float]:
    """Median and 99th percentile, ns in, µs out."""
    lat = sorted(latencies_ns)
    return (percentile(lat, 0.5, presorted=True) / 1000,
            percentile(lat, 0.99, presorted=True) / 1000)


@dataclass
class ChaosConfig:
    """Faults applied to the pool behind ``admin`` during the run (issue: long mode)."""

    admin: str
    kill_every: float = 0.0          # SIGKILL a random accepting worker this often
    scale_every: float = 0.0         # change the worker count this often
    scale_min: int = 1
    scale_max: int = 4
    final_workers: int = 0           # scale back to this at the end (0 = as found)


class ChaosTally(Protocol):
    """Where :class:`Chaos` counts what it did (a stress run's result)."""

    chaos_kills: int
    chaos_scales: int
    pool_back_to_n: bool | None


@dataclass
class ChaosCounts:
    """A :class:`ChaosTally` of its own, for workloads whose result has no such fields."""

    chaos_kills: int = 0
    chaos_scales: int = 0
    pool_back_to_n: bool | None = None


class Chaos:
    """Kills and rescales the pool under test on a schedule (``step``), then scales it
    back and waits for it to settle (``finish``)."""

    def __init__(self, cfg: ChaosConfig, rng: random.Random, result: ChaosTally) -> None:
        self.cfg = cfg
        self.rng = rng
        self.r = result
        self.admin = AdminClient(cfg.admin, timeout=10.0)
        now = time.monotonic()
        self.next_kill = now + cfg.kill_every if cfg.kill_every > 0 else float("inf")
        self.next_scale = now + cfg.scale_every if cfg.scale_every > 0 else float("inf")
        self.initial = self.admin.call("status").get("desired", 0)

    def step(self, now: float) -> None:
        if now >= self.next_kill:
            self.next_kill = now + self.cfg.kill_every
            st = self.admin.call("status")
            live = [w for w in st["workers"] if w["state"] == "ACCEPTING" and w["pid"]]
            if live:
                victim = self.rng.choice(live)
                try:
                    # The pool's own worker, named by the pool's admin socket.
                    os.kill(int(victim["pid"]), signal.SIGKILL)
                    self.r.chaos_kills += 1
                except ProcessLookupError:
                    pass
        if now >= self.next_scale:
            self.next_scale = now + self.cfg.scale_every
            n = self.rng.randint(self.cfg.scale_min, self.cfg.scale_max)
            self.admin.call("scale", n=n, check=False)
            self.r.chaos_scales += 1

    def finish(self, timeout: float = 60.0) -> None:
        """Scale back and wait until the pool has exactly that many accepting workers."""
        want = self.cfg.final_workers or self.initial
        self.admin.call("scale", n=want, check=False)

        def back(st: dict[str, Any]) -> bool:
            return bool(st.get("accepting") == want and not any(
                w["state"] in ("SPAWNING", "READY", "DRAINING") for w in st["workers"]))

        try:
            wait_status(self.admin, back, timeout, 0.1, tolerate=())
        except NotReady:
            return  # not known to be back: pool_back_to_n stays unset
        self.r.pool_back_to_n = True


#: ``--json -``: the result goes to stdout as the only thing there
JSON_STDOUT = "-"


def report(json_dest: str | None, summary: str, data: dict[str, Any]) -> None:
    """Print ``summary``; write ``data`` as JSON to ``json_dest`` (a file, or ``-``).

    With ``-`` stdout carries the JSON object alone (the summary goes to stderr), so
    ``msgr stress --json - | jq`` works.
    """
    if json_dest == JSON_STDOUT:
        print(summary, file=sys.stderr)
        print(json.dumps(data))
        return
    print(summary)
    if json_dest:
        with open(json_dest, "w") as f:
            json.dump(data, f, indent=2)
