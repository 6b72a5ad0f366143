"""``msgr bench``: measurements against named peers, each in one run (not timed tests)."""

from __future__ import annotations

from typing import Any

from tools.bench import kv, memif, ring, tcp, worker_pool

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks against peers (tcp, ring, memif)")
    bench_sub = p.add_subparsers(dest="bench", metavar="{tcp,ring,memif}", required=True)
    for module in (tcp, worker_pool, ring, memif, kv):
        module.register(bench_sub)
