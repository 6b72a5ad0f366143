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

import argparse
import collections
import glob
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pool.api import (
    AsyncConnection, Backoff, Dispatcher, EntityType, EventCenter, HandshakeFailure, Message,
    Messenger, Policy,
)
from pool.apps import make_stack
from pool.auth import AuthSettings, KeyringError, load_keyring

__all__ = ["register", "run", "ChaosConfig", "StressConfig", "StressResult", "run_stress"]

PING = 1


def parse_target(text: str) -> tuple[str, int] | str:
    """HOST:PORT (IPv6 as [::1]:PORT) or a Unix socket path."""
    if text.startswith("/") or text.startswith("\0"):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"target {text!r} must be HOST:PORT or a socket path")
    return (host.strip("[]") or "127.0.0.1", int(port))


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
class ChaosConfig:
    """Faults applied to the pool behind ``admin`` during the run (issue: long mode)."""

    admin: str
    kill_every: float = 0.0          # SIGKILL a random accepting worker this often
    scale_every: float = 0.0         # change the worker count this often
    scale_min: int = 1
    scale_max: int = 4
    final_workers: int = 0           # scale back to this at the end (0 = as found)


class _Chaos:
    def __init__(self, cfg: ChaosConfig, rng: random.Random, result: StressResult) -> None:
        from pool.supervisor.admin import AdminClient
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.admin.call("status")
            if st.get("accepting") == want and not any(
                    w["state"] in ("SPAWNING", "READY", "DRAINING") for w in st["workers"]):
                self.r.pool_back_to_n = True
                return
            time.sleep(0.1)  # polling the pool, bounded by the deadline


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
    try:
        conns = []
        for i in range(cfg.conns):
            stack = make_stack(cfg.stack, memif_mode=cfg.memif_mode) \
                if cfg.stack != "posix" else None
            m = Messenger(center, entity_type=EntityType.CLIENT, policy=policy, stack=stack,
                          inject_socket_failures=cfg.inject_socket_failures,
                          backoff=Backoff(0.05, cfg.max_backoff), seed=rng.getrandbits(32),
                          auth=cfg.auth, identity_check=cfg.identity_check)
            m.add_dispatcher(checker)
            msgrs.append(m)
            conns.append(m.connect(targets[i % len(targets)]))
        chaos = _Chaos(cfg.chaos, rng, result) if cfg.chaos else None
        start = time.monotonic()
        end_send = start + cfg.duration if cfg.duration > 0 else float("inf")
        cap = cfg.messages if cfg.messages > 0 else (1 << 62)
        seq = 0
        last_progress = 0.0
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
            if cfg.progress and now - last_progress > 0.25:
                last_progress = now
                sys.stderr.write(f"\r  sent {seq:>9}  received {result.received:>9}  "
                                 f"in flight {checker.outstanding:>5}  "
                                 f"resets {result.session_resets:>4}  ")
                sys.stderr.flush()
        result.elapsed_s = time.monotonic() - start
        if chaos is not None:
            chaos.finish()
        if cfg.progress:
            sys.stderr.write("\n")
        result.sent = seq
        result.connected = len(checker.connected)
        result.last_error = next((c.last_error for c in reversed(conns) if c.last_error), "")
        result.lost = sum(len(q) for q in checker.pending.values())
        result.msgs_per_s = result.received / result.elapsed_s if result.elapsed_s else 0.0
        lat = sorted(checker.latencies)
        if lat:
            result.p50_us = lat[len(lat) // 2] / 1000
            result.p99_us = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000
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
        for m in msgrs:
            m.shutdown()
        center.process_events(0)
        center.close()


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
        last = next((c.last_error for c in reversed(conns) if c.last_error), "none")
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


def register(sub: Any) -> None:
    p = sub.add_parser("stress", help="verify a live pool under load (Ceph SyntheticWorkload)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=parse_target, default=("127.0.0.1", 6800),
                   help="HOST:PORT of the pool (default 127.0.0.1:6800)")
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--messages", type=int, default=None,
                   help="messages to send (default 10000; with --duration: no cap unless "
                        "given)")
    p.add_argument("--size-min", type=int, default=32)
    p.add_argument("--size-max", type=int, default=4096)
    p.add_argument("--window", type=int, default=64, help="messages in flight at most")
    p.add_argument("--policy", choices=["lossless", "lossy"], default="lossless")
    p.add_argument("--inject-socket-failures", type=int, default=0, metavar="N",
                   help="shut the socket down with probability 1/N per I/O (client side)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to keep sending")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the last replies")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="give up, saying why, if no connection completes a handshake in S")
    p.add_argument("--identity", choices=["strict", "record"], default=None,
                   help="strict: refuse a server whose SERVER_IDENT does not name the "
                        "--target (Ceph); record (default for clients): accept and record "
                        "it, as a client behind port forwarding needs")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-resets", action="store_true",
                   help="also fail if any session was reset (scale tests)")
    p.add_argument("--auth", choices=["none", "secret"], default="none")
    p.add_argument("--keyring", metavar="FILE", help="TOML keyring (mode 0600) for --auth secret")
    p.add_argument("--name", default="client.admin", help="our entity name in the keyring")
    p.add_argument("--mode", choices=["crc", "secure"], default="crc",
                   help="secure = AES-128-GCM on every frame (needs --auth secret)")
    p.add_argument("--stack", choices=["posix", "dpdk", "rdma"], default="posix",
                   help="dpdk (memif) and rdma: --target is the pool's --stack-path; "
                        "sessions spread over its per-worker endpoints")
    p.add_argument("--memif-mode", choices=["interrupt", "poll"], default="interrupt",
                   help="dpdk: busy-poll our memif connections (poll) or sleep until kicked")
    p.add_argument("--chaos-admin", metavar="PATH",
                   help="admin socket of the pool under test: enables --kill-every/--scale-every")
    p.add_argument("--kill-every", type=float, default=0.0, metavar="S",
                   help="SIGKILL a random worker of that pool every S seconds")
    p.add_argument("--scale-every", type=float, default=0.0, metavar="S",
                   help="rescale that pool to a random size in --scale-range every S seconds")
    p.add_argument("--scale-range", default="1-4", metavar="MIN-MAX")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON")
    p.add_argument("--app", choices=["echo", "kv"], default="echo",
                   help="kv: write then read back keys of a `serve --app kv` pool "
                        "(tools.stress_kv; --messages = operations, half writes, half reads)")
    p.set_defaults(func=run)


def _message_cap(args: argparse.Namespace) -> int:
    """--messages as given; unset: no cap with --duration, else 10,000."""
    if args.messages is not None:
        return int(args.messages)
    return 0 if args.duration > 0 else 10_000


def run(args: argparse.Namespace) -> int:
    if args.conns < 1 or args.window < 1:
        print("msgr stress: --conns and --window must be at least 1", file=sys.stderr)
        return 2
    if getattr(args, "app", "echo") == "kv":
        from tools.stress_kv import run_cli
        return run_cli(args)
    try:
        keyring = load_keyring(args.keyring) if args.keyring else {}
        auth = AuthSettings(args.auth, args.mode, args.name, keyring)
    except (KeyringError, ValueError) as err:
        print(f"msgr stress: {err}", file=sys.stderr)
        return 2
    target = args.target
    if args.stack != "posix":
        target = args.target if isinstance(args.target, str) else f"{args.target[0]}"
    chaos = None
    if args.chaos_admin:
        lo, _, hi = args.scale_range.partition("-")
        if not (lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi)):
            print("msgr stress: --scale-range must look like 2-4", file=sys.stderr)
            return 2
        chaos = ChaosConfig(args.chaos_admin, args.kill_every, args.scale_every,
                            int(lo), int(hi))
    elif args.kill_every or args.scale_every:
        print("msgr stress: --kill-every/--scale-every need --chaos-admin PATH",
              file=sys.stderr)
        return 2
    cfg = StressConfig(
        chaos=chaos,
        stack=args.stack,
        memif_mode=args.memif_mode,
        auth=auth,
        target=target, conns=args.conns, messages=_message_cap(args),
        connect_timeout=args.connect_timeout, identity_check=args.identity,
        size_min=args.size_min, size_max=args.size_max, window=args.window,
        policy=args.policy, inject_socket_failures=args.inject_socket_failures,
        duration=args.duration, timeout=args.timeout, seed=args.seed,
        progress=sys.stderr.isatty())
    stop = {"flag": False}

    def on_signal(_s: int, _f: object) -> None:
        stop["flag"] = True

    old = signal.signal(signal.SIGINT, on_signal)
    try:
        result = run_stress(cfg, lambda: stop["flag"])
    except ValueError as err:
        print(f"msgr stress: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, old)
    print(format_summary(result))
    if args.json:
        data = asdict(result)
        data["ok"] = result.ok
        data["target"] = str(args.target)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
    ok = result.ok and not (args.no_resets and (result.session_resets or result.connection_resets
                                                or result.connection_refused))
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(os.EX_USAGE)
