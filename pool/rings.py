"""Old import path of the ring capacity, kept for pool/kv.py (being rewritten on another
branch); the mesh is :mod:`pool.supervisor.ring_mesh`, the Router :mod:`pool.worker.router`,
the capacity :mod:`pool.worker.config`."""

from __future__ import annotations

from pool.worker.config import DEFAULT_CAPACITY

__all__ = ["DEFAULT_CAPACITY"]
