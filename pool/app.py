"""Old import path of :mod:`pool.worker.app`, kept for pool/apps.py and pool/kv.py (being
rewritten on another branch); import from pool.worker.app instead."""

from __future__ import annotations

from pool.worker.app import (
    AppFactory,
    PeerMap,
    ReplyCallback,
    WorkerApp,
    WorkerContext,
    import_factory,
)

__all__ = ["AppFactory", "PeerMap", "ReplyCallback", "WorkerApp", "WorkerContext", "import_factory"]
