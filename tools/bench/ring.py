"""``msgr bench ring``: the asyncmsgr shared-memory ring against IPC peers, in one run.

Every peer moves the same raw payloads (64 B and 4096 B) from a producer process to a
consumer process (both forked from here, pinned to different CPUs when there are two),
measured the same way:

* **throughput**: the producer sends ``--count`` messages (or for ``--duration`` s) in
  batches of ``--batch``, using each peer's natural batched call where it has one
  (ring ``send_many``/``drain``, faster-fifo ``put_many``/``get_many``) and one call per
  message otherwise; then a 1-byte stop message. The consumer adds up ``len()`` of every
  message; the run only counts if messages and bytes received equal what was sent.
  Rate = messages / (consumer's last receive - producer's first send), both on
  CLOCK_MONOTONIC, which all processes share.
* **latency**: ping-pong of one message over two channels; one-way = round trip / 2;
  p50/p99 over ``--pings`` round trips (or ``--duration`` s).

Peers that are not installed (the optional ``bench`` extra) are reported as
``missing: <reason>``; a peer that fails or times out is reported as ``error: <reason>``.
Children are bounded by a deadline and SIGKILLed past it; segments are memfds and
iceoryx2 services are deleted, so nothing is left in /dev/shm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from tools.bench.common import fork_child
from tools.bench.ring_peers import (
    PEERS,
    RING,
    RING_BLOCK,
    RING_SLEEP,
    SIZES,
    STOP,
    FasterFifoPeer,
    IceoryxPeer,
    MPQueuePeer,
    Peer,
    PipePeer,
    RingPeer,
    ZmqPeer,
)
from tools.common import percentile

__all__ = ["PEERS", "register", "run"]

# -- harness ----------------------------------------------------------------------------------


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _child(fn: Callable[[], dict[str, Any]], out_fd: int) -> int:
    """Run ``fn`` in this forked child and write its JSON result (an error becomes one)."""
    code = 0
    try:
        result = fn()
    except BaseException as e:  # noqa: BLE001 - report anything to the parent
        result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        code = 1
    os.write(out_fd, json.dumps(result).encode())
    return code


def _spawn(fn: Callable[[], dict[str, Any]]) -> tuple[int, int]:
    return fork_child(lambda w: _child(fn, w))


def _collect(children: list[tuple[int, int]], timeout: float) -> list[dict[str, Any]]:
    """Read every child's result; SIGKILL all of them past ``timeout`` (bounded run)."""
    deadline = time.monotonic() + timeout
    results: list[dict[str, Any]] = []
    try:
        for pid, fd in children:
            chunks = []
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError(f"timed out after {timeout:.0f}s")
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
            data = b"".join(chunks)
            results.append(json.loads(data) if data else {"error": "child died without a result"})
    finally:
        for pid, fd in children:
            os.close(fd)
            with contextlib.suppress(ProcessLookupError):
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return results


def _payload(size: int) -> bytes:
    return bytes((i * 31 + 7) & 0xFF for i in range(size))


class _Sync:
    """Start/finish handshake between the parent and its two children (over pipes).

    Children report ``ready`` once their endpoint exists, start on ``go``, report
    ``done`` when their traffic is over, and tear down only after *both* are done, so
    no process removes a queue, socket or port the other still reads (iceoryx2 and zmq
    lose undelivered messages when the sender's port goes away; os._exit skips flushes).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.up_r, self.up_w = os.pipe()
        self.down_r, self.down_w = os.pipe()

    def _wait(self, fd: int, n: int, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"timed out waiting for {what} after {self.timeout:.0f}s")
            chunk = os.read(fd, n - got)
            if not chunk:
                raise EOFError(f"pipe closed waiting for {what}")
            got += len(chunk)

    # children
    def ready(self) -> None:
        os.write(self.up_w, b"r")
        self._wait(self.down_r, 1, "go")

    def finished(self) -> None:
        os.write(self.up_w, b"d")
        self._wait(self.down_r, 1, "release")

    # parent
    def wait_children(self, n: int) -> None:
        self._wait(self.up_r, n, "children")

    def release(self, n: int) -> None:
        os.write(self.down_w, b"x" * n)

    def close(self) -> None:
        for fd in (self.up_r, self.up_w, self.down_r, self.down_w):
            os.close(fd)


def _pair(peer: Peer, first: Callable[[_Sync], dict[str, Any]],
          second: Callable[[_Sync], dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Fork ``first``, wait until its endpoint exists, then ``second``; run both to
    completion under ``timeout``; return their results in that order (errors raised)."""
    sync = _Sync(timeout)

    def wrap(fn: Callable[[_Sync], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        def body() -> dict[str, Any]:
            res = fn(sync)
            if isinstance(peer, IceoryxPeer):
                peer.release_children()
            return res
        return body

    kids: list[tuple[int, int]] = []
    try:
        kids.append(_spawn(wrap(first)))
        sync.wait_children(1)  # its endpoint exists (zmq bind, iceoryx2 publisher)
        kids.append(_spawn(wrap(second)))
        sync.wait_children(1)
        sync.release(2)  # go
        sync.wait_children(2)  # both done with traffic
        sync.release(2)  # tear down
        started, kids = kids, []
        results = _collect(started, timeout)
    finally:
        if kids:
            _kill_all(kids)
        sync.close()
    for res in results:
        if "error" in res:
            raise RuntimeError(res["error"] + "\n" + res.get("trace", ""))
    return results


def _kill_all(kids: list[tuple[int, int]]) -> None:
    for pid, fd in kids:
        os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _throughput(peer: Peer, size: int, count: int, batch: int, duration: float,
                cpus: tuple[int | None, int | None], timeout: float) -> dict[str, Any]:
    payload = _payload(size)

    def producer(sync: _Sync) -> dict[str, Any]:
        _pin(cpus[0])
        tx = peer.tx(0)
        sync.ready()
        msgs = [payload] * batch
        sent = 0
        t0 = time.perf_counter()
        stop_at = t0 + duration
        while sent < count:
            tx.send_batch(msgs)
            sent += batch
            if sent % (batch * 64) == 0 and time.perf_counter() > stop_at:
                break
        tx.send_batch([STOP])
        sync.finished()
        return {"t0": t0, "sent": sent}

    def consumer(sync: _Sync) -> dict[str, Any]:
        _pin(cpus[1])
        rx = peer.rx(0)
        sync.ready()
        n = 0
        total = 0
        while True:
            msgs = rx.recv_batch()
            for m in msgs:
                total += len(m)
            n += len(msgs)
            if len(msgs[-1]) == 1:
                break
            rx.done()
        t1 = time.perf_counter()
        rx.done()
        sync.finished()
        return {"t1": t1, "received": n - 1, "bytes": total - 1}

    if peer.sender_first:
        prod_res, cons_res = _pair(peer, producer, consumer, timeout)
    else:
        cons_res, prod_res = _pair(peer, consumer, producer, timeout)
    if cons_res["received"] != prod_res["sent"] or cons_res["bytes"] != prod_res["sent"] * size:
        raise RuntimeError(f"lost or corrupted: sent {prod_res['sent']}, received "
                           f"{cons_res['received']} msgs / {cons_res['bytes']} bytes")
    elapsed = cons_res["t1"] - prod_res["t0"]
    rate = prod_res["sent"] / elapsed
    return {"msgs": prod_res["sent"], "seconds": elapsed, "msgs_per_s": rate,
            "mb_per_s": rate * size / 1e6}


def _latency(peer: Peer, size: int, pings: int, duration: float,
             cpus: tuple[int | None, int | None], timeout: float) -> dict[str, Any]:
    payload = _payload(size)

    def server(sync: _Sync) -> dict[str, Any]:
        _pin(cpus[1])
        rx = peer.rx(0)
        tx = peer.tx(1)
        sync.ready()
        while True:
            msgs = rx.recv_batch()
            tx.send_batch(msgs)  # copies (the ring's send_many) before the release
            last = len(msgs[-1])
            rx.done()
            if last == 1:
                break
        sync.finished()
        return {}

    def client(sync: _Sync) -> dict[str, Any]:
        _pin(cpus[0])
        rx = peer.rx(1)
        tx = peer.tx(0)
        sync.ready()
        one = [payload]
        samples: list[int] = []
        clock = time.perf_counter_ns
        stop_at = clock() + int(duration * 1e9)
        for i in range(pings + pings // 10):
            t = clock()
            tx.send_batch(one)
            msgs = rx.recv_batch()
            ok = len(msgs) == 1 and len(msgs[0]) == size
            rx.done()
            samples.append(clock() - t)
            if not ok:
                raise RuntimeError("bad echo")
            if i & 255 == 0 and clock() > stop_at:
                break
        tx.send_batch([STOP])
        rx.recv_batch()
        rx.done()
        sync.finished()
        warm = len(samples) // 11  # drop the warm-up tenth
        return {"samples": samples[warm:]}

    _, cli_res = _pair(peer, server, client, timeout)
    ns = sorted(cli_res["samples"])
    if not ns:
        raise RuntimeError("no samples")

    def pct(p: float) -> float:
        return percentile(ns, p, presorted=True) / 2 / 1000  # round trip -> one way, in µs

    return {"pings": len(ns), "p50_us": pct(0.50), "p99_us": pct(0.99),
            "mean_us": statistics.fmean(ns) / 2 / 1000}


def _make_peers(spins: int) -> dict[str, Peer]:
    return {RING: RingPeer(False, 0, RING), RING_BLOCK: RingPeer(True, spins, RING_BLOCK),
            RING_SLEEP: RingPeer(True, 0, RING_SLEEP),
            "multiprocessing.Queue": MPQueuePeer(), "faster-fifo": FasterFifoPeer(),
            "pyzmq-ipc": ZmqPeer(), "os.pipe": PipePeer(), "iceoryx2": IceoryxPeer()}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every selected peer and size; return the JSON document."""
    peers = _make_peers(args.spins)
    names = list(PEERS) if not args.peers else args.peers
    for n in names:
        if n not in peers:
            raise SystemExit(f"unknown peer {n!r}; known: {', '.join(PEERS)}")
    cpus_avail = sorted(os.sched_getaffinity(0))
    cpus: tuple[int | None, int | None] = (
        (cpus_avail[0], cpus_avail[1]) if len(cpus_avail) >= 2 and not args.no_pin else (None, None))
    doc: dict[str, Any] = {
        "command": " ".join(["msgr", "bench", "ring"] + sys.argv[sys.argv.index("ring") + 1:])
        if "ring" in sys.argv else "msgr bench ring",
        "machine": {"cpus": os.cpu_count(), "affinity": cpus_avail, "pinned": list(cpus),
                    "platform": platform.platform(), "python": platform.python_version()},
        "params": {"count": args.count, "batch": args.batch, "pings": args.pings,
                   "duration_s": args.duration, "spins": args.spins, "ring_bytes": args.ring_bytes,
                   "sizes": list(SIZES), "repeat": args.repeat},
    }
    runs = []
    for r in range(args.repeat):
        print(f"run {r + 1}/{args.repeat}", file=sys.stderr)
        load0 = os.getloadavg()[0]
        one: dict[str, Any] = {"peers": _one_pass(args, peers, names, cpus)}
        # Other work on the machine shows up here: a ratio means little if this is high.
        one["loadavg_1min"] = [load0, os.getloadavg()[0]]
        _ratios(one)
        runs.append(one)
    doc["peers"] = _median(runs)
    doc["loadavg_1min"] = [x for run in runs for x in run["loadavg_1min"]]
    _ratios(doc)
    if args.repeat > 1:
        doc["runs"] = runs
        doc["targets_met_per_run"] = {
            k: [run.get("targets", {}).get(k, {}).get("met") for run in runs]
            for k in doc.get("targets", {})}
    return doc


def _one_pass(args: argparse.Namespace, peers: dict[str, Peer], names: list[str],
              cpus: tuple[int | None, int | None]) -> dict[str, Any]:
    """Every selected peer and size once (one run: ratios within it are comparable)."""
    out: dict[str, Any] = {}
    for name in names:
        peer = peers[name]
        entry: dict[str, Any] = {"status": "ok", "results": {}}
        out[name] = entry
        why = peer.missing()
        if why:
            entry["status"] = f"missing: {why}"
            print(f"  {name}: missing: {why}", file=sys.stderr)
            continue
        for size in SIZES:
            res: dict[str, Any] = {}
            for kind in ("throughput", "latency"):
                peer.setup(size, args.ring_bytes)
                try:
                    if kind == "throughput":
                        count = args.count if size <= 64 else max(1000, args.count // 4)
                        res.update(_throughput(peer, size, count, args.batch, args.duration, cpus,
                                               args.timeout))
                    else:
                        res.update(_latency(peer, size, args.pings, args.duration, cpus,
                                            args.timeout))
                except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
                    res[f"{kind}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    entry["status"] = "error"
                finally:
                    peer.close()
            entry["results"][str(size)] = res
            print(f"  {name} {size} B: " + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in res.items() if k != "seconds"), file=sys.stderr)
    return out


_MEDIAN_KEYS = ("msgs_per_s", "mb_per_s", "p50_us", "p99_us", "mean_us")


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per peer, size and figure: the median over runs (errors are kept, listed)."""
    out: dict[str, Any] = {}
    for name, entry in runs[0]["peers"].items():
        agg: dict[str, Any] = {"status": entry["status"], "results": {}}
        for run in runs[1:]:
            st = run["peers"][name]["status"]
            if st != "ok" and agg["status"] == "ok":
                agg["status"] = st
        for size in entry.get("results", {}):
            res: dict[str, Any] = {}
            for key in _MEDIAN_KEYS:
                vals = [run["peers"][name]["results"][size][key] for run in runs
                        if key in run["peers"][name]["results"].get(size, {})]
                if vals:
                    res[key] = statistics.median(vals)
                    res[f"{key}_runs"] = vals
            errs = [v for run in runs for k, v in run["peers"][name]["results"].get(size, {}).items()
                    if k.endswith("_error")]
            if errs:
                res["errors"] = errs
            agg["results"][size] = res
        out[name] = agg
    return out


def _ratios(doc: dict[str, Any]) -> None:
    peers = doc["peers"]
    ref = peers.get(RING, {}).get("results", {})
    for entry in peers.values():
        for size, res in entry.get("results", {}).items():
            base = ref.get(size, {})
            if "msgs_per_s" in res and "msgs_per_s" in base:
                res["throughput_ratio_to_ring"] = res["msgs_per_s"] / base["msgs_per_s"]
            if "p50_us" in res and "p50_us" in base:
                res["p50_ratio_to_ring"] = res["p50_us"] / base["p50_us"]
    targets: dict[str, Any] = {}

    def get(peer: str, size: str, key: str) -> float | None:
        v = peers.get(peer, {}).get("results", {}).get(size, {}).get(key)
        return float(v) if isinstance(v, (int, float)) else None

    others = [p for p in peers if not p.startswith("asyncmsgr")]
    best = max(((get(p, "64", "msgs_per_s") or 0.0, p) for p in others), default=(0.0, ""))
    for label, mode in (("spin", RING), ("spin_then_block", RING_BLOCK)):
        ring64 = get(mode, "64", "msgs_per_s")
        if ring64 and best[0]:
            r = ring64 / best[0]
            targets[f"tput_64B_{label}_vs_best_peer"] = {
                "best_peer": best[1], "ratio": r, "target": ">= 1.25", "met": r >= 1.25}
    p50 = get(RING, "64", "p50_us")
    if p50 is not None:
        targets["spin_p50_64B_us"] = {"value": p50, "target": "<= 3", "met": p50 <= 3.0}
        iox = get("iceoryx2", "64", "p50_us")
        if iox:
            targets["spin_p50_vs_iceoryx2"] = {"ratio": p50 / iox, "target": "<= 0.6",
                                               "met": p50 / iox <= 0.6}
    pipe50 = get("os.pipe", "64", "p50_us")
    for label, mode in (("block", RING_BLOCK), ("sleep_always", RING_SLEEP)):
        bp50 = get(mode, "64", "p50_us")
        if bp50 is not None and pipe50:
            targets[f"{label}_p50_vs_pipe_64B"] = {"ratio": bp50 / pipe50, "target": "<= 1.0",
                                                   "met": bp50 <= pipe50}
    doc["targets"] = targets


def format_table(doc: dict[str, Any]) -> str:
    """Markdown table: one row per peer and size, ratios to the spin-mode ring."""
    head = ("| peer | size | msgs/s | MB/s | × ring tput | p50 µs | p99 µs | × ring p50 |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = [head]

    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "—"

    for name, entry in doc["peers"].items():
        if entry["status"].startswith("missing"):
            rows.append(f"| {name} | — | {entry['status']} | | | | | |")
            continue
        for size, r in entry["results"].items():
            err = "; ".join([v for k, v in r.items() if k.endswith("_error")] + r.get("errors", []))
            rows.append(
                f"| {name} | {size} | {f(r.get('msgs_per_s'), ',.0f')} | {f(r.get('mb_per_s'), ',.1f')}"
                f" | {f(r.get('throughput_ratio_to_ring'), '.2f')} | {f(r.get('p50_us'), '.1f')}"
                f" | {f(r.get('p99_us'), '.1f')} | {f(r.get('p50_ratio_to_ring'), '.2f')} |"
                + (f" error: {err}" if err else ""))
    lines = ["\n".join(rows), ""]
    if "loadavg_1min" in doc:
        lines.append("- load average (1 min) at start/end of each run: "
                     + ", ".join(f"{x:.1f}" for x in doc["loadavg_1min"]))
    for k, t in doc.get("targets", {}).items():
        val = t.get("ratio", t.get("value"))
        lines.append(f"- {k}: {val:.3g} (target {t['target']}) {'MET' if t['met'] else 'MISSED'}"
                     + (f" [best peer: {t['best_peer']}]" if "best_peer" in t else ""))
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: str) -> str | None:
    """Bar charts of throughput and p50 per peer; returns a reason if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not installed ({e})"
    names = [n for n, e in doc["peers"].items() if e.get("results")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.38
    for ax, key, title in ((axes[0], "msgs_per_s", "throughput (msgs/s, log)"),
                           (axes[1], "p50_us", "one-way latency p50 (µs, log)")):
        for j, size in enumerate(SIZES):
            vals = [doc["peers"][n]["results"].get(str(size), {}).get(key) or 0 for n in names]
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=f"{size} B")
        ax.set_xticks([i + width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
    fig.suptitle("msgr bench ring — producer process → consumer process")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run(args: argparse.Namespace) -> int:
    doc = measure(args)
    print(format_table(doc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        why = plot(doc, args.plot)
        if why:
            print(f"no plot: {why}", file=sys.stderr)
    return 0 if all(not e["status"].startswith("error") for e in doc["peers"].values()) else 1


def register(subparsers: Any) -> None:
    """Add the ``ring`` subcommand to ``msgr bench``'s subparsers."""
    p = subparsers.add_parser("ring", help="shared-memory ring vs IPC peers (one run)",
                              description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--json", metavar="FILE", help="write every figure, per peer, to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG chart (needs matplotlib)")
    p.add_argument("--count", type=int, default=400_000,
                   help="messages per 64 B throughput run (a quarter for 4096 B)")
    p.add_argument("--duration", type=float, default=3.0,
                   help="cap in seconds on each throughput run and each ping-pong")
    p.add_argument("--pings", type=int, default=20_000, help="round trips per latency run")
    p.add_argument("--batch", type=int, default=64, help="messages per producer call")
    p.add_argument("--spins", type=int, default=2000,
                   help="checks before sleeping (asyncmsgr-ring-block)")
    p.add_argument("--ring-bytes", type=int, default=1 << 20, help="ring/queue capacity")
    p.add_argument("--peers", nargs="+", metavar="PEER", help=f"subset of: {', '.join(PEERS)}")
    p.add_argument("--no-pin", action="store_true", help="do not pin the two processes")
    p.add_argument("--timeout", type=float, default=60.0, help="kill a measurement after this")
    p.add_argument("--repeat", type=int, default=1,
                   help="interleaved runs; the table shows each figure's median")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m tools.bench.ring ring ...``."""
    parser = argparse.ArgumentParser(prog="msgr bench")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
