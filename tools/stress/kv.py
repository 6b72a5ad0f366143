"""``msgr stress --app kv``: write every key, then read every key back, through random
connections of a ``msgr serve --app kv`` pool (so most requests cross workers), optionally
while the pool rescales.

Verification: every acknowledged write must be readable with its latest value. A key has
at most one request outstanding at a time, so "latest" is well defined; a write that got
no acknowledgement (error reply, reset session) may or may not have been applied, so a
read may return it or the last acknowledged value — anything else is a *stale read*
(older acknowledged value or a value never written) or a *missing key* (not found). Reads
that fail with an error are retried (bounded) before being counted as errors.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pool.api import (
    AsyncConnection,
    Backoff,
    Dispatcher,
    EntityType,
    EventCenter,
    Message,
    Messenger,
    MessengerConfig,
    Policy,
)
from tools.progress import Progress

from .common import (
    DEFAULT_MESSAGES,
    JSON_STDOUT,
    Chaos,
    ChaosConfig,
    ChaosCounts,
    p50_p99_us,
    parse_scale_range,
    report,
)

__all__ = ["KV_MSG", "KvStressConfig", "KvStressResult", "format_kv_summary", "run_kv_stress"]

KV_MSG = 0x4B56


@dataclass
class KvStressConfig:
    target: tuple[str, int]
    conns: int = 8
    keys: int = 2000
    rounds: int = 2                  # times each key is written before the read phase
    size_min: int = 8
    size_max: int = 256
    window: int = 64
    timeout: float = 60.0
    seed: int | None = None
    read_retries: int = 5
    #: chaos: scale through these sizes, one step every ``scale_every`` seconds of the
    #: write phase (Python API; the CLI uses ``--chaos-admin``'s random sizes)
    admin: str | None = None
    scale_plan: list[int] = field(default_factory=list)
    scale_every: float = 0.0
    chaos: Chaos | None = None       # the CLI's --chaos-admin faults
    progress: bool = False           # a bar (terminal) or plain lines on stdout


@dataclass
class KvStressResult:
    sent: int = 0
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0               # replies are matched by id: order is not a contract
    corrupted: int = 0
    acked_writes: int = 0
    stale_reads: int = 0
    missing_keys: int = 0
    errors: int = 0
    read_errors: int = 0
    unacked_writes: int = 0
    session_resets: int = 0
    scales: int = 0
    elapsed_s: float = 0.0
    msgs_per_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.corrupted or self.stale_reads
                    or self.missing_keys or self.read_errors)


class _Client(Dispatcher):
    def __init__(self, result: KvStressResult) -> None:
        self.r = result
        self.pending: dict[int, tuple[AsyncConnection, Callable[[dict[str, Any]], None], int]] = {}
        self.lat: list[int] = []

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        front = msg.front
        if msg.type != KV_MSG or not isinstance(front, dict) or not isinstance(front.get("id"), int):
            self.r.corrupted += 1
            return
        entry = self.pending.pop(front["id"], None)
        if entry is None:
            self.r.duplicated += 1
            return
        self.r.received += 1
        self.lat.append(time.monotonic_ns() - entry[2])
        entry[1](front)

    def _reset(self, conn: AsyncConnection) -> None:
        self.r.session_resets += 1
        for rid, (c, cb, _t) in list(self.pending.items()):
            if c is conn:
                del self.pending[rid]
                cb({"ok": False, "err": "session reset", "reset": True})

    def ms_handle_reset(self, conn: AsyncConnection) -> None:
        self._reset(conn)

    def ms_handle_remote_reset(self, conn: AsyncConnection) -> None:
        self._reset(conn)


def run_kv_stress(cfg: KvStressConfig) -> KvStressResult:
    rng = random.Random(cfg.seed)
    r = KvStressResult()
    client = _Client(r)
    center = EventCenter(name="stress-kv")
    msgrs: list[Messenger] = []
    # every key written ``rounds`` times, then read once
    bar = Progress("stress kv", cfg.keys * (cfg.rounds + 1), "ops", enabled=cfg.progress)
    admin = None
    if cfg.admin and cfg.scale_plan:
        from pool.supervisor.admin import AdminClient
        admin = AdminClient(cfg.admin, timeout=10.0)
    try:
        conns = []
        for _ in range(cfg.conns):
            m = Messenger(center, MessengerConfig(backoff=Backoff(0.05, 1.0),
                                                  seed=rng.getrandbits(32)),
                          entity_type=EntityType.CLIENT, policy=Policy.lossless_client())
            m.add_dispatcher(client)
            msgrs.append(m)
            conns.append(m.connect(cfg.target))
        keys = [f"key-{i}-{rng.getrandbits(24):06x}" for i in range(cfg.keys)]
        acked: dict[str, bytes] = {}
        maybe: dict[str, set[bytes]] = {k: set() for k in keys}
        busy: set[str] = set()
        next_id = 0

        def send(op: str, key: str, val: bytes | None, cb: Callable[[dict[str, Any]], None]) -> None:
            nonlocal next_id
            next_id += 1
            conn = conns[rng.randrange(len(conns))]
            client.pending[next_id] = (conn, cb, time.monotonic_ns())
            r.sent += 1
            conn.send_message(Message(KV_MSG, {"op": op, "k": key, "v": val, "id": next_id}))

        def note_error(front: dict[str, Any]) -> None:
            r.errors += 1
            if len(r.error_samples) < 10:
                r.error_samples.append(str(front.get("err")))

        # -- write phase --------------------------------------------------------------------
        todo = [k for _ in range(cfg.rounds) for k in keys]
        rng.shuffle(todo)
        start = time.monotonic()
        plan = list(cfg.scale_plan)
        next_scale = start + cfg.scale_every if plan and admin is not None else float("inf")
        deadline = start + cfg.timeout
        deferred: list[str] = []
        while (todo or deferred or client.pending) and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_scale and plan:
                assert admin is not None
                admin.call("scale", n=plan.pop(0), check=False)
                r.scales += 1
                next_scale = now + cfg.scale_every if plan else float("inf")
            if cfg.chaos is not None:
                cfg.chaos.step(now)
            if deferred:
                todo.extend(deferred)
                deferred = []
            while todo and len(client.pending) < cfg.window:
                key = todo.pop()
                if key in busy:
                    deferred.append(key)
                    continue
                busy.add(key)
                val = rng.randbytes(rng.randint(cfg.size_min, cfg.size_max))
                maybe[key].add(val)

                def on_put(front: dict[str, Any], key: str = key, val: bytes = val) -> None:
                    busy.discard(key)
                    if front.get("ok"):
                        r.acked_writes += 1
                        acked[key] = val
                        maybe[key] = {val}  # older unacknowledged values are superseded
                    else:
                        r.unacked_writes += 1
                        if not front.get("reset"):
                            note_error(front)

                send("put", key, val, on_put)
            center.process_events(0.01 if client.pending else 0)
            bar.update(r.received, phase="write", resets=r.session_resets)
        # Let the scale plan finish before reading, so reads also cross a scale change.
        while plan and admin is not None and time.monotonic() < deadline:
            admin.call("scale", n=plan.pop(0), check=False)
            r.scales += 1
            wait_until = time.monotonic() + cfg.scale_every
            while time.monotonic() < wait_until:
                center.process_events(0.01)

        # -- read phase ---------------------------------------------------------------------
        reads = list(keys)
        rng.shuffle(reads)
        tries: dict[str, int] = {}
        while (reads or client.pending) and time.monotonic() < deadline:
            if cfg.chaos is not None and reads:
                cfg.chaos.step(time.monotonic())  # reads also cross scale changes
            while reads and len(client.pending) < cfg.window:
                key = reads.pop()

                def on_get(front: dict[str, Any], key: str = key) -> None:
                    val = front.get("v")
                    if front.get("ok"):
                        allowed = maybe[key] | ({acked[key]} if key in acked else set())
                        if not isinstance(val, (bytes, bytearray)) or bytes(val) not in allowed:
                            r.stale_reads += 1
                        return
                    if front.get("err") == "not found":
                        if key in acked:
                            r.missing_keys += 1
                        return
                    note_error(front)
                    tries[key] = tries.get(key, 0) + 1
                    if tries[key] <= cfg.read_retries:
                        reads.append(key)
                    elif key in acked:
                        r.read_errors += 1

                send("get", key, None, on_get)
            center.process_events(0.01 if client.pending else 0)
            bar.update(r.received, phase="read", resets=r.session_resets)
        r.elapsed_s = time.monotonic() - start
        r.lost = len(client.pending)
        if reads:
            r.read_errors += len(reads)
        r.msgs_per_s = r.received / r.elapsed_s if r.elapsed_s else 0.0
        if client.lat:
            r.p50_us, r.p99_us = p50_p99_us(client.lat)
        return r
    finally:
        bar.close()
        for m in msgrs:
            m.shutdown()
        center.process_events(0)
        center.close()


def format_kv_summary(r: KvStressResult) -> str:
    keys = ("sent", "received", "lost", "duplicated", "corrupted", "acked_writes",
            "unacked_writes", "stale_reads", "missing_keys", "errors", "read_errors",
            "session_resets", "scales")
    lines = [f"  {k:<16}{getattr(r, k)}" for k in keys]
    lines.append(f"  {'msgs/s':<16}{r.msgs_per_s:,.0f}")
    lines.append(f"  {'p50 / p99 (µs)':<16}{r.p50_us:,.0f} / {r.p99_us:,.0f}")
    verdict = ("PASS: every acknowledged write was read back with its latest value" if r.ok
               else "FAIL: " + ", ".join(f"{k}={getattr(r, k)}" for k in
                                        ("lost", "duplicated", "corrupted", "stale_reads",
                                         "missing_keys", "read_errors") if getattr(r, k)))
    return "\n".join(lines + [verdict] + [f"  note: {e}" for e in r.error_samples[:5]])


def run_cli(args: Any) -> int:
    """``msgr stress --app kv``: the shared stress options mapped onto the kv workload."""
    import sys
    from dataclasses import asdict

    if not isinstance(args.target, tuple):
        print("msgr stress --app kv: --target must be HOST:PORT", file=sys.stderr)
        return 2
    chaos = None
    chaos_result = ChaosCounts()
    if args.chaos_admin:
        scale_range = parse_scale_range(args.scale_range)
        if scale_range is None:
            print("msgr stress: --scale-range must look like 2-4", file=sys.stderr)
            return 2
        chaos = Chaos(ChaosConfig(args.chaos_admin, args.kill_every, args.scale_every, *scale_range),
                      random.Random(args.seed), chaos_result)
    operations = DEFAULT_MESSAGES if args.messages is None else args.messages
    cfg = KvStressConfig(target=args.target, conns=args.conns, keys=max(1, operations // 2),
                         rounds=1, size_min=max(1, args.size_min),
                         size_max=min(max(args.size_min, args.size_max), 60 * 1024),
                         window=args.window, timeout=args.timeout, seed=args.seed, chaos=chaos,
                         progress=args.json != JSON_STDOUT)
    result = run_kv_stress(cfg)
    if chaos is not None:
        chaos.finish()
        result.scales = chaos_result.chaos_scales
    data = asdict(result)
    data["ok"] = result.ok
    data["chaos_kills"] = chaos_result.chaos_kills
    data["pool_back_to_n"] = chaos_result.pool_back_to_n
    data["target"] = str(args.target)
    report(args.json, format_kv_summary(result), data)
    ok = result.ok and chaos_result.pool_back_to_n is not False
    return 0 if ok else 1
