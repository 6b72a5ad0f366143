"""``msgr bench``: measurements against named peers, each in one run (not timed tests)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["register"]

#: each module exposes register(bench_subparsers)
BENCH_MODULES = ["tools.bench_tcp", "tools.bench_pool", "tools.bench_ring", "tools.bench_memif", "tools.bench_kv"]


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks against peers (tcp, ring, memif)")
    bench_sub = p.add_subparsers(dest="bench", metavar="{tcp,ring,memif}", required=True)
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.register(bench_sub)
