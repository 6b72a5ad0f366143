"""``msgr serve --app kv``: a sharded key-value store across the pool's workers
(:mod:`pool.apps.kv.app` has the protocol and its consistency argument)."""

from .app import KvApp, kv_app_factory
from .shards import NSHARDS, owners_for, shard_of

__all__ = ["NSHARDS", "KvApp", "kv_app_factory", "owners_for", "shard_of"]
