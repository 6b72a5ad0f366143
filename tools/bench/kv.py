"""``msgr bench kv``: what a cross-worker kv GET costs over a GET served locally, in one run.

Starts ``msgr serve --app kv`` (``--workers`` workers, processor accept mode), writes
``--keys`` keys through one client connection, then sends GETs one at a time (window 1)
for random keys for ``--duration`` seconds. Every reply says which worker owns the client
connection (``at``) and which one executed the GET (``w``): equal means a local GET, else
the request crossed the shared-memory ring and back (``submit_to``). Both populations are
measured interleaved, in the same run, on the same connection; the figure of merit is
``cross p50 - local p50`` (the issue's target: <= 10 µs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
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
from tools.common import NotReady, percentile, wait_status
from tools.stress.kv import KV_MSG

__all__ = ["register", "run", "measure"]

TARGET_ADDED_P50_US = 10.0


class _Rx(Dispatcher):
    def __init__(self) -> None:
        self.front: dict[str, Any] | None = None

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        self.front = msg.front


def _wait_accepting(admin: str, n: int, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """``n`` workers ACCEPTING and all of them in the published peer map."""
    def ready(st: dict[str, Any]) -> bool:
        return bool(st.get("accepting") == n and len(st.get("peer_map", {}).get("slots", [])) == n)

    try:
        return wait_status(admin, ready, timeout, alive=lambda: proc.poll() is None, client_timeout=2.0)
    except NotReady:
        if proc.poll() is not None:
            raise RuntimeError(f"msgr serve exited with status {proc.returncode}") from None
        raise RuntimeError(f"pool not ready with {n} workers in {timeout}s") from None


def measure(port: int, keys: int, duration: float, seed: int = 1) -> dict[str, Any]:
    """GET latency split by local/cross-worker against a kv pool on ``port``."""
    rng = random.Random(seed)
    center = EventCenter(name="bench-kv")
    rx = _Rx()
    m = Messenger(center, MessengerConfig(backoff=Backoff(0.05, 1.0)),
                  entity_type=EntityType.CLIENT, policy=Policy.lossless_client())
    m.add_dispatcher(rx)
    try:
        conn = m.connect(("127.0.0.1", port))
        rid = 0

        def call(op: str, key: str, val: bytes | None) -> dict[str, Any]:
            nonlocal rid
            rid += 1
            rx.front = None
            conn.send_message(Message(KV_MSG, {"op": op, "k": key, "v": val, "id": rid}))
            deadline = time.monotonic() + 10
            while rx.front is None:
                center.process_events(0)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no reply to {op} {key}")
            return rx.front

        names = [f"bench-{i}" for i in range(keys)]
        for k in names:
            r = call("put", k, k.encode() * 4)
            if not r.get("ok"):
                raise RuntimeError(f"put failed: {r}")
        for k in names[:200]:  # warm-up: code paths, rings, allocator
            call("get", k, None)
        lat: dict[str, list[float]] = {"local": [], "cross": []}
        end = time.monotonic() + duration
        errors = 0
        while time.monotonic() < end:
            k = names[rng.randrange(keys)]
            t0 = time.perf_counter_ns()
            r = call("get", k, None)
            dt = (time.perf_counter_ns() - t0) / 1000
            if not r.get("ok") or r.get("v") != k.encode() * 4:
                errors += 1
                continue
            lat["local" if r.get("w") == r.get("at") else "cross"].append(dt)
        out: dict[str, Any] = {"errors": errors}
        for name, xs in lat.items():
            out[name] = {"n": len(xs), "p50_us": round(percentile(xs, 0.5), 1),
                         "p99_us": round(percentile(xs, 0.99), 1)}
        out["added_p50_us"] = round(out["cross"]["p50_us"] - out["local"]["p50_us"], 1)
        out["added_p99_us"] = round(out["cross"]["p99_us"] - out["local"]["p99_us"], 1)
        out["target_added_p50_us"] = TARGET_ADDED_P50_US
        out["target_met"] = bool(out["added_p50_us"] <= TARGET_ADDED_P50_US)
        return out
    finally:
        m.shutdown()
        center.process_events(0)
        center.close()


def register(sub: Any) -> None:
    p = sub.add_parser("kv", help="cross-worker vs local kv GET latency (shared-memory rings)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--keys", type=int, default=512)
    p.add_argument("--duration", type=float, default=5.0, help="seconds of GETs")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--app-config", default="", metavar="JSON",
                   help="passed to msgr serve (e.g. ring/poller spin settings)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.workers < 2:
        print("msgr bench kv: --workers must be at least 2 (cross-worker GETs)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-kv-"))
    admin = str(tmp / "admin.sock")
    log = open(tmp / "serve.log", "w+")
    cmd = [sys.executable, "-m", "tools.cli", "serve", "--bind", "127.0.0.1:0", "--workers",
           str(args.workers), "--app", "kv", "--admin", admin]
    if args.app_config:
        cmd += ["--app-config", args.app_config]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        st = _wait_accepting(admin, args.workers, proc, 20.0)
        res = measure(int(st["bind"][1]), args.keys, args.duration, args.seed)
    except Exception as exc:  # noqa: BLE001 - report, then clean up
        log.seek(0)
        print(f"msgr bench kv: {exc}\n{log.read()[-2000:]}", file=sys.stderr)
        return 1
    finally:
        from pool.supervisor.admin import AdminClient, AdminError
        try:
            AdminClient(admin, timeout=5.0).call("stop")
        except (OSError, AdminError):
            proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    res["workers"] = args.workers
    res["keys"] = args.keys
    res["duration_s"] = args.duration
    res["cpus"] = os.cpu_count()
    res["command"] = "msgr bench kv " + " ".join(
        f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("workers", "keys", "duration", "seed"))
    if args.app_config:
        res["command"] += f" --app-config '{args.app_config}'"
    print(f"{'GET':<8}{'n':>8}{'p50 µs':>10}{'p99 µs':>10}")
    for name in ("local", "cross"):
        row = res[name]
        print(f"{name:<8}{row['n']:>8}{row['p50_us']:>10.1f}{row['p99_us']:>10.1f}")
    verdict = "met" if res["target_met"] else "NOT met"
    print(f"cross-worker adds {res['added_p50_us']:.1f} µs p50, {res['added_p99_us']:.1f} µs p99 "
          f"(target <= {TARGET_ADDED_P50_US:.0f} µs p50: {verdict}); errors {res['errors']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["errors"] == 0 else 1
