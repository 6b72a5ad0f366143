"""``msgr stress``: Ceph's SyntheticWorkload against a live pool, verified end to end.

Every tracked message carries ``[seq, buffer index]`` in its front and a random payload.
The server echoes it. For every reply the client asserts, as Ceph's test does, that it is
the oldest outstanding message of that connection (per-connection order, no gaps, no
duplicates) and that the payload is byte-identical. Outstanding messages are forgiven only
when the messenger reports a reset of the session (``ms_handle_reset`` /
``ms_handle_remote_reset``); anything still outstanding at the end is *lost*.

Each connection is its own client Messenger (one session per peer, as in Ceph); all of
them share one EventCenter in this process.
"""

from __future__ import annotations

import collections
import glob
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
    HandshakeFailure,
    Message,
    Messenger,
    MessengerConfig,
    Policy,
)
from pool.api import AuthSettings
from tools.progress import Progress
from transport.stacks import make_stack

from .common import Chaos, ChaosConfig, p50_p99_us

__all__ = ["StressConfig", "StressResult", "format_summary", "run_stress"]

PING = 1


@dataclass
class StressConfig:
    target: tuple[str, int] | str
    conns: int = 8
    messages: int = 10_000
    size_min: int = 32
    size_max: int = 4096
    window: int = 64
    policy: str = "lossless"
    inject_socket_failures: int = 0
    duration: float = 0.0        # > 0: run this long (messages is then a cap, 0 = none)
    timeout: float = 120.0       # wait this long for the last replies
    seed: int | None = None
    max_backoff: float = 1.0
    progress: bool = False
    auth: AuthSettings | None = None
    stack: str = "posix"
    memif_mode: str = "interrupt"
    chaos: ChaosConfig | None = None
    #: give up when no connection completed a handshake within this many seconds
    connect_timeout: float = 10.0
    #: "strict" / "record" (None: the client default, record; see protocol.identity)
    identity_check: str | None = None


@dataclass
class StressResult:
    sent: int = 0
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    forgiven: int = 0
    session_resets: int = 0
    connection_resets: int = 0     # ECONNRESET seen by clients
    connection_refused: int = 0    # ECONNREFUSED seen by clients
    disconnects: int = 0           # orderly EOFs seen by clients
    injected_failures: int = 0
    chaos_kills: int = 0
    chaos_scales: int = 0
    pool_back_to_n: bool | None = None
    faults: int = 0
    reconnects: int = 0
    elapsed_s: float = 0.0
    msgs_per_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    conns: int = 0
    connected: int = 0             # connections that completed a handshake at least once
    #: unretryable handshake failures, reason -> how often (identity, auth, features)
    handshake_failures: dict[str, int] = field(default_factory=dict)
    last_error: str = ""           # the latest connection fault, in words
    gave_up: str = ""              # why the run stopped before its end, in words
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.reordered or self.corrupted
                    or self.gave_up) and self.pool_back_to_n is not False


class _Checker(Dispatcher):
    def __init__(self, buffers: list[bytes], result: StressResult) -> None:
        self.buffers = buffers
        self.r = result
        self.pending: dict[AsyncConnection, collections.deque[tuple[int, int, int]]] = \
            collections.defaultdict(collections.deque)
        self.outstanding = 0
        self.latencies: list[int] = []
        self.connected: set[AsyncConnection] = set()
        self.failed: set[AsyncConnection] = set()

    def ms_handle_connect(self, conn: AsyncConnection) -> None:
        self.connected.add(conn)
        self.failed.discard(conn)

    def ms_handle_error(self, conn: AsyncConnection, failure: HandshakeFailure) -> None:
        self.failed.add(conn)
        counts = self.r.handshake_failures
        counts[failure.reason] = counts.get(failure.reason, 0) + 1

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        r = self.r
        front = msg.front
        if msg.type != PING or not isinstance(front, list) or len(front) != 2:
            r.errors.append(f"unexpected reply type {msg.type} front {front!r}")
            r.corrupted += 1
            return
        seq, idx = front
        q = self.pending[conn]
        if not q or seq < q[0][0]:
            r.duplicated += 1  # already answered (or forgiven): a duplicate delivery
            return
        head = q.popleft()
        self.outstanding -= 1
        if head[0] != seq:
            r.reordered += 1
            # Resynchronise: drop entries older than this reply, counted as reordered.
            while q and q[0][0] < seq:
                q.popleft()
                self.outstanding -= 1
                r.reordered += 1
            if q and q[0][0] == seq:
                q.popleft()
                self.outstanding -= 1
        if not (0 <= idx < len(self.buffers)) or bytes(msg.data) != self.buffers[idx]:
            r.corrupted += 1
        r.received += 1
        self.latencies.append(time.monotonic_ns() - head[2])

    def _forgive(self, conn: AsyncConnection) -> None:
        q = self.pending.pop(conn, None)
        if q:
            self.r.forgiven += len(q)
            self.outstanding -= len(q)
        self.r.session_resets += 1

    def ms_handle_reset(self, conn: AsyncConnection) -> None:
        self._forgive(conn)

    def ms_handle_remote_reset(self, conn: AsyncConnection) -> None:
        self._forgive(conn)


def run_stress(cfg: StressConfig, should_stop: Callable[[], bool] = lambda: False
               ) -> StressResult:
    """Run the workload; bounded by ``messages``/``duration`` and ``timeout``."""
    rng = random.Random(cfg.seed)
    if cfg.size_min < 0 or cfg.size_max < cfg.size_min:
        raise ValueError("need 0 <= --size-min <= --size-max")
    buffers = [rng.randbytes(rng.randint(cfg.size_min, cfg.size_max)) for _ in range(64)]
    result = StressResult(conns=cfg.conns)
    checker = _Checker(buffers, result)
    policy = Policy.lossless_client() if cfg.policy == "lossless" else Policy.lossy_client()
    center = EventCenter(name="stress")
    targets: list[Any] = [cfg.target]
    if cfg.stack != "posix":
        # A pool serves memif/rdma at <path>.<slot>, one endpoint per worker.
        base = str(cfg.target)
        targets = sorted(glob.glob(glob.escape(base) + ".[0-9]*")) or [base]
    msgrs: list[Messenger] = []
    bar = Progress("stress", cfg.messages or None, enabled=cfg.progress)
    try:
        conns = []
        for i in range(cfg.conns):
            stack = make_stack(cfg.stack, memif_mode=cfg.memif_mode) \
                if cfg.stack != "posix" else None
            mcfg = MessengerConfig(inject_socket_failures=cfg.inject_socket_failures,
                                   backoff=Backoff(0.05, cfg.max_backoff),
                                   seed=rng.getrandbits(32), identity_check=cfg.identity_check)
            m = Messenger(center, mcfg, entity_type=EntityType.CLIENT, policy=policy,
                          stack=stack, auth=cfg.auth)
            m.add_dispatcher(checker)
            msgrs.append(m)
            conns.append(m.connect(targets[i % len(targets)]))
        chaos = Chaos(cfg.chaos, rng, result) if cfg.chaos else None
        start = time.monotonic()
        end_send = start + cfg.duration if cfg.duration > 0 else float("inf")
        cap = cfg.messages if cfg.messages > 0 else (1 << 62)
        seq = 0
        lossless = cfg.policy == "lossless"
        while True:
            now = time.monotonic()
            why = _hopeless(checker, conns, now - start, cfg)
            if why:
                result.gave_up = why
                break
            sending = seq < cap and now < end_send and not should_stop()
            if sending:
                while checker.outstanding < cfg.window and seq < cap:
                    conn = conns[rng.randrange(len(conns))]
                    idx = rng.randrange(len(buffers))
                    if lossless:
                        checker.pending[conn].append((seq, idx, time.monotonic_ns()))
                        checker.outstanding += 1
                    conn.send_message(Message(PING, [seq, idx], data=buffers[idx]))
                    seq += 1
            elif checker.outstanding <= 0:
                break
            elif now > (end_send if cfg.duration > 0 else start) + cfg.timeout and not sending:
                result.errors.append(f"{checker.outstanding} replies missing after "
                                     f"waiting {cfg.timeout:.0f}s")
                break
            if not lossless and not sending:
                # Lossy runs track nothing: drain briefly and stop.
                center.process_events(0.05)
                break
            center.process_events(0.05)
            if chaos is not None and sending:
                chaos.step(now)
            bar.update(result.received, sent=seq, in_flight=checker.outstanding,
                       resets=result.session_resets)
        result.elapsed_s = time.monotonic() - start
        if chaos is not None:
            chaos.finish()
        bar.close()
        result.sent = seq
        result.connected = len(checker.connected)
        result.last_error = _last_error(conns)
        result.lost = sum(len(q) for q in checker.pending.values())
        result.msgs_per_s = result.received / result.elapsed_s if result.elapsed_s else 0.0
        if checker.latencies:
            result.p50_us, result.p99_us = p50_p99_us(checker.latencies)
        for m in msgrs:
            st = m.stats
            result.connection_resets += st["econnreset"]
            result.connection_refused += st["econnrefused"]
            result.disconnects += st["eof"]
            result.injected_failures += st["injected_failures"]
            result.faults += st["faults"]
            result.reconnects += st["reconnects"]
        return result
    finally:
        bar.close()  # idempotent; also restores the terminal after an error
        for m in msgrs:
            m.shutdown()
        center.process_events(0)
        center.close()


def _last_error(conns: list[AsyncConnection]) -> str:
    """The latest connection fault among ``conns``, in words ("" if none faulted)."""
    return next((c.last_error for c in reversed(conns) if c.last_error), "")


def _hopeless(checker: _Checker, conns: list[AsyncConnection], elapsed: float,
              cfg: StressConfig) -> str:
    """Why waiting longer cannot help (in words), or "" while it still can."""
    if checker.connected:
        return ""
    if conns and all(c in checker.failed for c in conns):
        reasons = list(checker.r.handshake_failures)
        return f"every connection failed its handshake: {reasons[-1]}"
    if elapsed >= cfg.connect_timeout:
        refused = sum(c.msgr.stats["econnrefused"] for c in conns)
        last = _last_error(conns) or "none"
        return (f"nothing could connect to {cfg.target} within {cfg.connect_timeout:g}s: "
                f"{refused} attempts refused (ECONNREFUSED); last error: {last}")
    return ""


def format_summary(r: StressResult) -> str:
    rows = [
        ("sent", r.sent), ("received", r.received), ("lost", r.lost),
        ("duplicated", r.duplicated), ("reordered", r.reordered), ("corrupted", r.corrupted),
        ("forgiven (reset notified)", r.forgiven), ("session resets", r.session_resets),
        ("ECONNRESET / ECONNREFUSED", f"{r.connection_resets} / {r.connection_refused}"),
        ("faults / reconnects", f"{r.faults} / {r.reconnects}"),
        ("injected socket failures", r.injected_failures),
        ("chaos: workers killed / rescales", f"{r.chaos_kills} / {r.chaos_scales}"),
        ("pool back to N", "-" if r.pool_back_to_n is None else str(r.pool_back_to_n)),
        ("msgs/s", f"{r.msgs_per_s:,.0f}"), ("RTT p50 / p99 (µs)", f"{r.p50_us:,.0f} / {r.p99_us:,.0f}"),
        ("connected / conns", f"{r.connected} / {r.conns}"),
        ("elapsed (s)", f"{r.elapsed_s:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    verdict = "PASS: every tracked message came back exactly once, in order, intact" if r.ok \
        else "FAIL: " + ", ".join([r.gave_up] * bool(r.gave_up) + [
            f"{k}={getattr(r, k)}" for k in ("lost", "duplicated", "reordered", "corrupted")
            if getattr(r, k)])
    notes = [f"  handshake failed {n}x: {why}" for why, n in r.handshake_failures.items()]
    if r.last_error and not r.ok:
        notes.append(f"  last connection error: {r.last_error}")
    return "\n".join(lines + [verdict] + notes[:5] + [f"  note: {e}" for e in r.errors[:5]])
