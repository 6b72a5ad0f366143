"""``msgr bench tcp``: asyncmsgr against the servers a user would otherwise pick.

One run, one machine, the same msgpack request/response payloads for every server; one
client process drives one server process over loopback.

Servers: asyncmsgr (crc mode, lossless session, one Messenger), a bare asyncio Protocol
echo server, a bare uvloop one, a raw ``select.epoll`` loop (all three with a 4-byte
length prefix), and pyzmq DEALER/ROUTER. Bare servers decode the msgpack request and
encode the reply, as a real service would.

The client for the bare servers is a blocking socket loop that keeps ``window`` requests
in flight: it writes all missing requests with one ``sendall``, reads with ``recv_into``
into a preallocated buffer and parses every complete reply in it, so the client is never
the slower side by construction. The asyncmsgr client is a Messenger (it must speak
msgr2): that costs the client more CPU, which only hurts asyncmsgr's figure.

Per server: requests/s at window 1 and window 128, round-trip p50/p99 at window 1, the
server process's own CPU microseconds per request (utime+stime from /proc), and its peak
RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from typing import Any

from tools.bench.common import (
    ForkedCall,
    fork_server,
    latency_us,
    proc_cpu,
    proc_hwm_kb,
)
from tools.bench.tcp_peers import SERVERS
from tools.common import free_port
from tools.progress import Progress

__all__ = ["register", "run"]

# -- process plumbing -------------------------------------------------------------------------

def _fork_server(kind: str, port: int) -> int:
    return fork_server(lambda ready: SERVERS[kind][0](port, ready), f"{kind} server")


def _run_client(kind: str, port: int, window: int, payload: bytes, duration: float,
                with_latency: bool) -> tuple[int, list[int], float]:
    """Run the client in a forked process; returns (requests, latencies ns, elapsed)."""
    def client() -> list[Any]:
        lat: list[int] | None = [] if with_latency else None
        t0 = time.monotonic()
        n = SERVERS[kind][1](port, window, payload, duration, lat)
        return [n, lat or [], time.monotonic() - t0]

    n, lat, elapsed = ForkedCall(client, f"{kind} client").result()
    return int(n), list(lat), float(elapsed)


def measure(kind: str, payload_size: int, duration: float) -> dict[str, Any]:
    port = free_port()
    pid = _fork_server(kind, port)
    payload = os.urandom(payload_size)
    try:
        _run_client(kind, port, 16, payload, min(0.3, duration), False)  # warm-up
        out: dict[str, Any] = {"server": kind, "payload": payload_size}
        n1, lat, t1 = _run_client(kind, port, 1, payload, duration, True)
        out["rps_w1"] = n1 / t1
        out["rtt_p50_us"] = latency_us(lat, 0.5)
        out["rtt_p99_us"] = latency_us(lat, 0.99)
        cpu0 = proc_cpu(pid)
        n128, _, t128 = _run_client(kind, port, 128, payload, duration, False)
        cpu1 = proc_cpu(pid)
        out["rps_w128"] = n128 / t128
        out["cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / max(1, n128)
        out["peak_rss_kb"] = proc_hwm_kb(pid)
        return out
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


def available(kind: str) -> str | None:
    """None if the peer can run, else why not."""
    mod = SERVERS[kind][2]
    if mod is None:
        return None
    try:
        __import__(mod)
    except ImportError as err:
        return f"missing: {err} (pip install -e '.[bench]')"
    return None


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for size in sorted({r["payload"] for r in rows if "payload" in r}):
        base = next((r for r in rows if r.get("server") == "asyncmsgr" and r["payload"] == size
                     and "rps_w128" in r), None)
        lines.append(f"\npayload {size} B")
        lines.append(f"  {'server':<17} {'req/s w128':>11} {'ratio':>6} {'req/s w1':>9} "
                     f"{'p50 µs':>8} {'p99 µs':>8} {'cpu µs/req':>10} {'ratio':>6} {'RSS MiB':>8}")
        for r in rows:
            if r.get("payload") != size:
                continue
            if "error" in r:
                lines.append(f"  {r['server']:<17} {r['error']}")
                continue
            ratio = f"{r['rps_w128'] / base['rps_w128']:.2f}" if base else "-"
            cratio = f"{r['cpu_us_per_req'] / base['cpu_us_per_req']:.2f}" if base else "-"
            lines.append(
                f"  {r['server']:<17} {r['rps_w128']:>11,.0f} {ratio:>6} {r['rps_w1']:>9,.0f} "
                f"{r['rtt_p50_us']:>8.0f} {r['rtt_p99_us']:>8.0f} {r['cpu_us_per_req']:>10.1f} "
                f"{cratio:>6} {r['peak_rss_kb'] / 1024:>8.1f}")
    lines.append("\nratio = peer / asyncmsgr (req/s: > 1 means the peer is faster; "
                 "cpu: > 1 means the peer uses more CPU per request)")
    return "\n".join(lines)


def register(sub: Any) -> None:
    p = sub.add_parser("tcp", help="asyncmsgr vs asyncio/uvloop/epoll/pyzmq/grpc over loopback")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON ('-': to stdout, alone)")
    p.add_argument("--plot", metavar="FILE.png")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--payloads", default="64,4096", help="comma-separated payload sizes")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds, each measuring every server in turn; figures are the "
                        "median over rounds (the per-round figures go to --json)")
    p.add_argument("--instructions", action="store_true",
                   help="instead of timing: run each server under valgrind's callgrind and "
                        "report instructions per request (steady where clocks are not)")
    p.add_argument("--requests", default="2000,10000", metavar="N1,N2",
                   help="with --instructions: the two request counts whose difference "
                        "cancels start-up (default 2000,10000)")
    p.set_defaults(func=run)


_FIGURES = ("rps_w1", "rtt_p50_us", "rtt_p99_us", "rps_w128", "cpu_us_per_req", "peak_rss_kb")
# Issue 16's targets: (what, figure, numerator, denominator, target, True when the
# ratio numerator / denominator must be >= it).
_TARGETS = (
    ("req/s w128 vs uvloop", "rps_w128", "asyncmsgr", "uvloop", 1.0, True),
    ("req/s w128 vs pyzmq", "rps_w128", "asyncmsgr", "pyzmq", 2.0, True),
    ("server CPU/req vs epoll", "cpu_us_per_req", "asyncmsgr", "epoll", 1.5, False),
    ("w1 RTT p50 vs asyncio", "rtt_p50_us", "asyncmsgr", "asyncio", 1.2, False),
    ("secure CPU/req vs crc", "cpu_us_per_req", "asyncmsgr-secure", "asyncmsgr", 1.3, False),
)


def median_rows(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (server, payload): the median of each figure over the rounds that
    measured it (an error row stands only if no round measured that pair)."""
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rounds[0]):
        same = [r[i] for r in rounds if "rps_w128" in r[i]]
        if not same:
            out.append(row)
            continue
        merged: dict[str, Any] = {"server": row["server"], "payload": row["payload"],
                                  "rounds": len(same)}
        for fig in _FIGURES:
            merged[fig] = statistics.median(r[fig] for r in same)
        out.append(merged)
    return out


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 16's targets, at each payload measured, read from ``rows``: ratio, target,
    met or not."""
    out: list[str] = []
    for payload in sorted({int(r["payload"]) for r in rows if "rps_w128" in r}):
        by = {r["server"]: r for r in rows if r.get("payload") == payload and "rps_w128" in r}
        lines = []
        for what, fig, num, den, target, higher in _TARGETS:
            a, b = by.get(num), by.get(den)
            if a is None or b is None or not b[fig]:
                continue
            ratio = a[fig] / b[fig]
            met = ratio >= target if higher else ratio <= target
            sign = ">=" if higher else "<="
            lines.append(f"  {what:<26} {ratio:5.2f}x  (target {sign} {target}x: "
                         f"{'met' if met else 'NOT met'})")
        if lines:
            out += [f"\ntargets at {payload} B (asyncmsgr / peer):", *lines]
    return out


def run(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    servers = [s for s in args.servers.split(",") if s]
    unknown = [s for s in servers if s not in SERVERS]
    if unknown:
        print(f"msgr bench tcp: unknown servers {unknown}; choose from {list(SERVERS)}",
              file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("msgr bench tcp: --repeat must be >= 1", file=sys.stderr)
        return 2
    missing = {kind: available(kind) for kind in servers}
    if args.instructions:
        return _run_instructions(args, servers, missing)
    rounds: list[list[dict[str, Any]]] = []
    sizes = [int(x) for x in args.payloads.split(",")]
    to_stdout = args.json == "-"  # the JSON alone on stdout: tables to stderr, no progress
    bar = Progress("bench tcp", args.repeat * len(sizes) * len(servers), "runs", enabled=not to_stdout)
    with bar:
        for rnd in range(args.repeat):
            rows = []
            for size in sizes:
                for kind in servers:
                    why = missing[kind]
                    if why:
                        rows.append({"server": kind, "payload": size, "error": why})
                    else:
                        bar.update(bar.completed, round=f"{rnd + 1}/{args.repeat}", now=f"{kind} {size} B")
                        try:
                            rows.append(measure(kind, size, args.duration))
                        except Exception as err:  # noqa: BLE001
                            rows.append({"server": kind, "payload": size, "error": f"failed: {err}"})
                    bar.update(bar.completed + 1)
            rounds.append(rows)
    rows = median_rows(rounds)
    out = sys.stderr if to_stdout else sys.stdout
    print(format_table(rows), "\n".join(target_lines(rows)), "", text_chart(rows), sep="\n", file=out)
    meta = {"machine": os.uname().release, "cpus": os.cpu_count(), "duration_s": args.duration,
            "repeat": args.repeat, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if to_stdout:
        print(json.dumps({"meta": meta, "results": rows, "rounds": rounds}))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows, "rounds": rounds}, f, indent=2)
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _run_instructions(args: argparse.Namespace, servers: list[str],
                      missing: dict[str, str | None]) -> int:
    from tools.bench import instructions

    try:
        rows, table = instructions.run(args, servers, missing)
    except (RuntimeError, ValueError) as err:
        print(f"msgr bench tcp: {err}", file=sys.stderr)
        return 2
    print(table)
    if args.json:
        meta = {"machine": os.uname().release, "mode": "callgrind instructions",
                "python": sys.version.split()[0],
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    return 0


def text_chart(rows: list[dict[str, Any]], width: int = 40) -> str:
    """Bars of requests/s at window 128 per payload, as text (BENCHMARKS.md holds it)."""
    ok = [r for r in rows if "rps_w128" in r]
    lines = []
    for size in sorted({r["payload"] for r in ok}):
        rs = [r for r in ok if r["payload"] == size]
        top = max(r["rps_w128"] for r in rs)
        lines.append(f"requests/s, window 128, {size} B")
        for r in rs:
            bar = "#" * max(1, round(width * r["rps_w128"] / top))
            lines.append(f"  {r['server']:<17} {bar:<{width}} {r['rps_w128']:>9,.0f}")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install -e '.[bench]')", file=sys.stderr)
        return
    ok = [r for r in rows if "rps_w128" in r]
    sizes = sorted({r["payload"] for r in ok})
    fig, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 7), squeeze=False)
    panels = (("rps_w128", "requests/s, window 128"), ("cpu_us_per_req", "server CPU µs/request"))
    for row, (fig_key, title) in zip(axes, panels):
        for ax, size in zip(row, sizes):
            rs = [r for r in ok if r["payload"] == size]
            ax.bar([r["server"] for r in rs], [r[fig_key] for r in rs])
            ax.set_title(f"{title}, {size} B")
            ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path)
