"""``msgr bench pool``: how the pool scales with workers, in both accept modes.

For 1, 2 and 4 workers behind ``--accept processor`` and ``--accept reuseport``: a real
``msgr serve`` pool, two client processes with many lossless sessions each (verified
echo traffic, as ``msgr stress``), for a fixed time. Reported: total requests/s, and
the pool's CPU per request (all its workers' and the supervisor's utime+stime over the
run, divided by the requests served).

On a 2-core machine the clients compete with the workers for the same two cores, so
requests/s cannot grow much past 2 workers; CPU per request is the portable figure:
capacity ≈ cores / CPU-per-request on a machine with cores to spare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from pool.supervisor.admin import AdminClient, AdminError
from tools.bench.common import ForkedCall, proc_cpu
from tools.common import NotReady, free_port, wait_status
from tools.stress.echo import StressConfig, run_stress

__all__ = ["register", "run"]


def _client(port: int, conns: int, duration: float, seed: int) -> ForkedCall:
    """A forked stress client; its result is [replies received, verified]."""
    def client() -> list[Any]:
        res = run_stress(StressConfig(target=("127.0.0.1", port), conns=conns, messages=0,
                                      duration=duration, window=256, size_min=64,
                                      size_max=64, seed=seed))
        return [res.received, res.ok]

    return ForkedCall(client, "stress client")


def measure(accept: str, workers: int, duration: float, conns: int) -> dict[str, Any]:
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="msgr-bench-pool-")
    admin = os.path.join(tmp, "admin.sock")
    serve = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "serve", "--bind", f"127.0.0.1:{port}",
         "--workers", str(workers), "--accept", accept, "--admin", admin],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        try:
            st = wait_status(admin, lambda st: st.get("accepting") == workers, 30,
                             alive=lambda: serve.poll() is None)
        except NotReady:
            raise RuntimeError(f"pool with {workers} workers did not start") from None
        pids = [w["pid"] for w in st["workers"] if w["state"] == "ACCEPTING"] + [serve.pid]
        cpu0 = sum(proc_cpu(p) for p in pids)
        t0 = time.monotonic()
        clients = [_client(port, conns // 2, duration, 1 + i) for i in range(2)]
        received, ok = 0, True
        for client in clients:
            try:
                n, good = client.result()
            except RuntimeError:
                n, good = 0, False
            received += n
            ok = ok and good
        elapsed = time.monotonic() - t0
        cpu1 = sum(proc_cpu(p) for p in pids)
        return {"accept": accept, "workers": workers, "conns": conns, "requests": received,
                "rps": received / elapsed, "cpu_us_per_req": (cpu1 - cpu0) * 1e6 / max(1, received),
                "verified": ok}
    finally:
        try:
            AdminClient(admin).call("stop")
        except (OSError, AdminError):
            serve.terminate()
        serve.wait(timeout=60)


def register(sub: Any) -> None:
    p = sub.add_parser("pool", help="pool scaling: 1/2/4 workers x processor/reuseport")
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--accept", default="processor,reuseport")
    p.add_argument("--conns", type=int, default=32, help="sessions in total (two clients)")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = []
    for accept in args.accept.split(","):
        for n in (int(x) for x in args.workers.split(",")):
            print(f"measuring {accept} x {n} workers...", file=sys.stderr)
            rows.append(measure(accept, n, args.duration, args.conns))
    print(f"  {'accept':<10} {'workers':>7} {'req/s':>9} {'cpu µs/req':>10} {'verified':>8}")
    for r in rows:
        print(f"  {r['accept']:<10} {r['workers']:>7} {r['rps']:>9,.0f} "
              f"{r['cpu_us_per_req']:>10.1f} {str(r['verified']):>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus": os.cpu_count(), "results": rows}, f, indent=2)
    return 0 if all(r["verified"] for r in rows) else 1
