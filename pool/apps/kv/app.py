"""``msgr serve --app kv``: a sharded key-value store across the pool's workers.

Requests are Messenger messages whose front is ``{"op": "put"|"get"|"del", "k": str,
"v": bytes|None, "id": int}``; the reply has the same message type and front
``{"id", "ok", "v", "err"?, "w", "at"}`` (``w``: the worker that executed it, ``at``: the
one owning the connection). Replies may come back out of request order (match ``id``).

Sharding (:mod:`pool.apps.kv.shards`): ``zlib.crc32(key) % 1024`` picks a virtual shard;
the shard's owner is chosen among the ACCEPTING workers of the supervisor's versioned peer
map by rendezvous hashing, so a scale change moves only the shards whose winner changed.
A request that lands on a non-owner is forwarded with ``submit_to`` and
the reply goes back to the client's connection; the key and value cross the ring as raw
bytes (:mod:`pool.apps.kv.records`), decoded from msgpack once by the worker that received
the request and encoded once into the reply to the client.

Consistency: the data of a shard exists in exactly one place — held by one worker, or in
flight on one ring — and a worker serves a shard only if it holds it *and* is its owner in
its own current map. When the map changes, a holder that is no longer the owner sends the
data to the new owner (tagged with its map version; a receiver with an older map keeps it
until it catches up, so data never ping-pongs). The new owner parks requests for the shard
until the data arrives (bounded by ``move_timeout``, then an explicit error reply). A
request carries the sender's map version; a receiver with an older map parks it until it
has caught up. Rings are FIFO per pair, so a forwarded request sent after a shard's data
is served after the data is installed. Hence a read after an acknowledged write sees it,
across scale changes. A crashed worker's shards are lost (the supervisor's map lists it
as lost; the new owners start them empty) — replication is out of scope.

Drain: a retiring worker waits until the map excludes it and every shard it held was
acknowledged by its new owner, answers what it was serving for peers, and only then lets
the :class:`~pool.apps.messenger_app.MessengerApp` it composes migrate its connections
(each one once the requests it has in flight were answered: its drain hooks).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

from protocol.message import Message
from transport.stack import ConnectedSocket

from pool.api import AsyncConnection, Dispatcher
from pool.worker.app import AppFactory, PeerMap, ReplyCallback, WorkerApp, WorkerContext
from pool.worker.config import DEFAULT_CAPACITY

from ..messenger_app import MessengerApp
from .records import (
    MIG_TAG,
    OP_TAG,
    Reply,
    decode_migration,
    decode_op,
    decode_reply,
    encode_migration,
    encode_op,
    encode_reply,
)
from .shards import NSHARDS, owners_for, shard_of

__all__ = ["KvApp", "kv_app_factory"]

_MIG_CHUNK = 64 * 1024  # bytes of shard data per ring record (rings hold >= 256 KiB)
_MAX_HOPS = 8
_TICK = 0.05



class KvApp(WorkerApp, Dispatcher):
    """The sharded store: a WorkerApp that composes a :class:`MessengerApp` and is its
    dispatcher (client requests arrive in :meth:`ms_dispatch`)."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config = dict(config or {})
        self.msgr_app = MessengerApp(lambda: self, self.config, holds_worker=self._holds_worker,
                                     holds_connection=self._holds_connection)
        self.ctx: WorkerContext | None = None
        self.move_timeout = float(self.config.get("move_timeout", 5.0))
        self.max_value = int(self.config.get("max_value", 60 * 1024))
        self.mig_chunk = _MIG_CHUNK
        self.version = 0
        self.owners: list[int] | None = None
        self.map_slots: tuple[int, ...] = ()
        self.held: dict[int, dict[str, bytes]] = {}
        self.held_ver: dict[int, int] = {}
        self.expect: dict[int, int] = {}          # shard -> slot its data should come from
        self.partial: dict[int, dict[str, bytes]] = {}
        self.parked: list[tuple[float, Callable[[], None], Callable[[str], None]]] = []
        self.per_conn: dict[AsyncConnection, int] = {}
        self.mig_out = 0
        self.serving = 0
        self.kv_draining = False
        self.last_rx = 0.0        # when a peer last sent us something (drain quiet period)
        self.map_at = 0.0         # when the current map arrived
        self.quiet = float(self.config.get("drain_quiet", 0.2))
        self._timer: int | None = None
        self.kv_stats = {"local": 0, "forwarded": 0, "served_remote": 0, "shards_out": 0,
                         "shards_in": 0, "lost_shards": 0, "timeouts": 0}

    # -- seam -------------------------------------------------------------------------------

    def start(self, ctx: WorkerContext) -> None:
        self.msgr_app.start(ctx)
        self.ctx = ctx
        # Every ring record must fit the ring (max record = capacity / 2): keep shard
        # chunks and values well below it, whatever ``ring_capacity`` the pool uses.
        cap = int({**self.config, **dict(ctx.config)}.get("ring_capacity", DEFAULT_CAPACITY))
        self.mig_chunk = min(_MIG_CHUNK, cap // 8)
        self.max_value = min(self.max_value, cap // 8)
        pm = ctx.peer_map()
        if pm.version:
            self.on_peer_map(pm)

    def on_peer_map(self, peers: PeerMap) -> None:
        ctx = self.ctx
        assert ctx is not None
        if peers.version <= self.version:
            return
        me = ctx.slot
        self.map_at = time.monotonic()
        self.version = peers.version
        self.map_slots = peers.slots
        self.owners = owners = owners_for(peers.slots)
        prev = owners_for(peers.prev)
        lost = set(peers.lost)
        if owners is not None:
            for s in range(NSHARDS):
                if owners[s] != me:
                    self.expect.pop(s, None)
                    continue
                if s in self.held or s in self.partial:
                    continue
                src = self.expect.get(s)
                if src is None:
                    src = prev[s] if prev is not None else None
                    if src == me:
                        src = None
                if src is None or src in lost:
                    if src is not None:
                        self.kv_stats["lost_shards"] += 1
                    self._install(s, {}, self.version)
                else:
                    self.expect[s] = src
        for s, src in list(self.expect.items()):
            if src in lost:
                self.kv_stats["lost_shards"] += 1
                self._install(s, {}, self.version)
        self._rebalance()
        self._retry_parked()

    def handle_submit(self, src_slot: int, payload: bytes, reply: ReplyCallback) -> None:
        self.last_rx = time.monotonic()
        tag = payload[0] if payload else None
        try:
            if tag == OP_TAG:
                op, key, val, rv, hops = decode_op(payload)
            elif tag == MIG_TAG:
                mig = decode_migration(payload)
            else:
                raise ValueError(f"unknown kv record tag {tag!r}")
        except ValueError as exc:
            reply(exc)
            return
        if tag == MIG_TAG:
            shard, ver, last, chunk = mig
            self._on_migration(shard, ver, chunk, last)
            reply(b"ok")
            return
        self.serving += 1
        self.kv_stats["served_remote"] += 1

        def done(r: Reply) -> None:
            self.serving -= 1
            reply(encode_reply(r))

        self._handle(op, key, val, rv, hops, done)

    def adopt(self, conn: ConnectedSocket, meta: bytes) -> bool:
        return self.msgr_app.adopt(conn, meta)

    def connection_count(self) -> int:
        return self.msgr_app.connection_count()

    def throttle_counters(self) -> tuple[int, int, int]:
        return self.msgr_app.throttle_counters()

    def counters(self) -> tuple[int, int, int, int]:
        return self.msgr_app.counters()

    def retention_counters(self) -> tuple[int, int, int]:
        return self.msgr_app.retention_counters()

    def stop(self) -> None:
        self.msgr_app.stop()

    # -- client requests ----------------------------------------------------------------------

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        front = msg.front
        if not isinstance(front, dict):
            conn.send_message(Message(msg.type, {"id": None, "ok": False, "v": None,
                                                 "err": "front must be a map"}))
            return
        rid = front.get("id")
        op, key, val = front.get("op"), front.get("k"), front.get("v")
        if op not in ("put", "get", "del") or not isinstance(key, str):
            conn.send_message(Message(msg.type, {"id": rid, "ok": False, "v": None,
                                                 "err": f"bad request op={op!r} k={key!r}"}))
            return
        if op == "put" and (not isinstance(val, (bytes, bytearray)) or len(val) > self.max_value):
            conn.send_message(Message(msg.type, {"id": rid, "ok": False, "v": None,
                                                 "err": f"put needs bytes v of at most {self.max_value}"}))
            return
        self.per_conn[conn] = self.per_conn.get(conn, 0) + 1
        mtype = msg.type
        slot = self.ctx.slot if self.ctx is not None else -1

        def done(r: Reply) -> None:
            n = self.per_conn.get(conn, 1) - 1
            if n:
                self.per_conn[conn] = n
            else:
                self.per_conn.pop(conn, None)
            r["id"] = rid
            r["at"] = slot  # the worker that owns the client connection
            conn.send_message(Message(mtype, r))

        self._handle(op, key, bytes(val) if val is not None else None, self.version, 0, done)

    def _handle(self, op: str, key: str, val: bytes | None, rv: int, hops: int,
                done: Callable[[Reply], None]) -> None:
        ctx = self.ctx
        assert ctx is not None
        s = shard_of(key)
        retry = functools.partial(self._handle, op, key, val, rv, hops, done)
        if rv > self.version or self.owners is None:
            self._park(retry, done, f"waiting for peer map version {rv}")
            return
        owner = self.owners[s]
        if owner == ctx.slot:
            data = self.held.get(s)
            if data is None:
                self._park(retry, done, f"shard {s} is moving to this worker")
                return
            self.kv_stats["local"] += 1
            me = ctx.slot  # "w": the worker that executed it (benchmarks tell local apart)
            if op == "put":
                assert val is not None
                data[key] = val
                done({"ok": True, "v": None, "w": me})
            elif op == "get":
                v = data.get(key)
                done({"ok": True, "v": v, "w": me} if v is not None
                     else {"ok": False, "v": None, "err": "not found", "w": me})
            else:
                existed = data.pop(key, None) is not None
                done({"ok": True, "v": None, "existed": existed, "w": me})
            return
        if hops >= _MAX_HOPS:
            done({"ok": False, "v": None, "err": f"shard {s}: too many forwarding hops"})
            return
        self.kv_stats["forwarded"] += 1
        # The key and value travel raw (records.py): nothing re-encodes the value.
        payload = encode_op(op, key, val, self.version, hops + 1)

        def on_reply(r: bytes | Exception) -> None:
            if not isinstance(r, Exception):
                try:
                    done(decode_reply(r))
                    return
                except ValueError as exc:
                    r = exc
            done({"ok": False, "v": None, "err": f"worker {owner}: {type(r).__name__}: {r}"})

        ctx.submit_to(owner, payload, on_reply)

    # -- parking ------------------------------------------------------------------------------

    def _park(self, retry: Callable[[], None], done: Callable[[Reply], None], why: str) -> None:
        def expire(why: str = why) -> None:
            self.kv_stats["timeouts"] += 1
            done({"ok": False, "v": None, "err": f"timed out after {self.move_timeout}s: {why}"})

        self.parked.append((time.monotonic() + self.move_timeout, retry, lambda _w: expire()))
        self._arm()

    def _arm(self) -> None:
        if self._timer is None and self.ctx is not None:
            self._timer = self.ctx.center.create_time_event(_TICK, self._on_tick)

    def _on_tick(self) -> None:
        self._timer = None
        now = time.monotonic()
        keep = []
        for item in self.parked:
            if item[0] <= now:
                item[2]("")
            else:
                keep.append(item)
        self.parked = keep
        if self.parked:
            self._arm()

    def _retry_parked(self) -> None:
        if not self.parked:
            return
        items, self.parked = self.parked, []
        now = time.monotonic()
        for deadline, retry, expire in items:
            if deadline <= now:
                expire("")
                continue
            before = len(self.parked)
            retry()
            if len(self.parked) > before:
                # Parked again: keep its original deadline (bounded wait in total).
                _d, r, e = self.parked[-1]
                self.parked[-1] = (deadline, r, e)

    # -- shard data movement ------------------------------------------------------------------

    def _install(self, s: int, data: dict[str, bytes], ver: int) -> None:
        old = self.held.get(s)
        if old:
            data.update(old)  # what was written here since is newer than what arrived
        self.held[s] = data
        self.held_ver[s] = ver
        self.expect.pop(s, None)

    def _on_migration(self, s: int, ver: int, chunk: dict[str, bytes], last: bool) -> None:
        part = self.partial.setdefault(s, {})
        part.update(chunk)
        if not last:
            return
        del self.partial[s]
        self.kv_stats["shards_in"] += 1
        self._install(s, part, ver)
        self._rebalance()
        self._retry_parked()

    def _rebalance(self) -> None:
        """Send every held shard this worker does not own (in its current map) on."""
        ctx, owners = self.ctx, self.owners
        if ctx is None or owners is None:
            return
        for s in list(self.held):
            if owners[s] != ctx.slot and self.version >= self.held_ver.get(s, 0):
                self._send_shard(s, owners[s], self.held.pop(s))
                self.held_ver.pop(s, None)

    def _send_shard(self, s: int, target: int, data: dict[str, bytes]) -> None:
        ctx = self.ctx
        assert ctx is not None
        self.kv_stats["shards_out"] += 1
        chunks: list[dict[str, bytes]] = [{}]
        size = 0
        for k, v in data.items():
            if size > self.mig_chunk:
                chunks.append({})
                size = 0
            chunks[-1][k] = v
            size += len(k) + len(v) + 16
        for i, chunk in enumerate(chunks):
            payload = encode_migration(s, self.version, i == len(chunks) - 1, chunk)
            self.mig_out += 1

            def acked(r: bytes | Exception, s: int = s) -> None:
                self.mig_out -= 1
                if isinstance(r, Exception):
                    # The new owner died with it: those writes are lost with that worker.
                    ctx.log(f"kv: shard {s} migration to worker {target} failed: {r}")
                self._maybe_drained()

            ctx.submit_to(target, payload, acked)

    # -- drain --------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Hand off shards first (the map that excludes us was sent before DRAIN), then
        let the MessengerApp migrate the connections."""
        self.kv_draining = True
        self._maybe_drained()

    def _maybe_drained(self) -> None:
        if not self.kv_draining or self.msgr_app.draining:
            return
        ctx = self.ctx
        assert ctx is not None
        now = time.monotonic()
        # The quiet period lets peers that still used the previous map (their data or
        # requests may be on the ring to us) catch up before we stop taking them.
        if (ctx.slot in self.map_slots or self.held or self.expect or self.partial
                or self.mig_out or self.serving or now - self.last_rx < self.quiet
                or now - self.map_at < self.quiet):
            ctx.center.create_time_event(_TICK, self._maybe_drained)
            return
        ctx.log(f"kv: shards handed off (map v{self.version}); migrating connections")
        self.msgr_app.begin_drain()

    def _holds_worker(self) -> bool:
        # Keep answering forwarded requests for peers before the worker may exit.
        return bool(self.serving or self.parked)

    def _holds_connection(self, conn: AsyncConnection) -> bool:
        # A connection moves only once every request it sent was answered: a reply that
        # arrives after the move would go to a dead connection object.
        return bool(self.per_conn.get(conn))


def kv_app_factory(cfg: Mapping[str, Any]) -> AppFactory:
    """``load_app("kv", cfg)``: a factory for :class:`KvApp` (picklable under spawn)."""
    return functools.partial(KvApp, dict(cfg))
