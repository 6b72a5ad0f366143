"""The kv shard map: ``zlib.crc32(key) % NSHARDS`` picks a virtual shard; its owner among
the ACCEPTING workers is chosen by rendezvous hashing (highest ``crc32(f"{shard}:{slot}")``),
so a scale change moves only the shards whose winner changed."""

from __future__ import annotations

import zlib

__all__ = ["NSHARDS", "owners_for", "shard_of"]

NSHARDS = 1024


def shard_of(key: str) -> int:
    """The virtual shard of ``key`` (stable across processes and runs)."""
    return zlib.crc32(key.encode()) % NSHARDS


def owners_for(slots: tuple[int, ...] | list[int]) -> list[int] | None:
    """Rendezvous (highest random weight) owner of every shard among ``slots``."""
    if not slots:
        return None
    out = []
    for s in range(NSHARDS):
        best, best_w = -1, -1
        for slot in slots:
            w = zlib.crc32(f"{s}:{slot}".encode())
            if w > best_w or (w == best_w and slot < best):
                best, best_w = slot, w
        out.append(best)
    return out
