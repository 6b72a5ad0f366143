"""``msgr bench memif``: asyncmsgr's memif client against real DPDK (``dpdk-testpmd``).

testpmd runs as memif server with io forwarding and ``--port-topology=loop`` on lcore 1
(shared/notes/memif.md §4); this process pins itself to CPU 0 (trap 4), connects
(retrying "ID not found", trap 1), sends a warm-up frame (trap 2), then measures, per
mode (busy-poll: MASK_INT set on our rx ring; interrupt: we sleep in ``select`` on the
rx eventfd and testpmd kicks it):

* **pipelined**: 64-byte frames carrying a sequence number, at most ``--window`` in
  flight (≤ ring size − 32, trap 3), for ``--duration`` seconds; every returned frame is
  checked to be the next in sequence (lost/reordered frames are counted and reported);
* **rtt**: one frame at a time, round-trip time p50/p99.

**messenger** (``--messenger``): the same Messenger echo (``pool.apps.EchoDispatcher``,
stateful server, lossless client) between two local processes over ``MemifStack`` and
over ``PosixStack`` (TCP loopback and a Unix socket), in one run: requests/s at window
1 and 128, RTT p50/p99 at window 1, and the server process's CPU µs per request. This
is Messenger-on-a-stack in two processes, not the pool's ``msgr serve --stack dpdk``
(that path is verified in tests/pool/test_stacks_pool.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from tools.bench.common import ForkedCall, fork_server, latency_us, proc_cpu
from tools.bench.tcp_peers import messenger_client, serve_messenger
from transport.hugepages import hugepage_info, reserved_hugepages
from transport.memif import MemifConfig, MemifInterface, connect

__all__ = ["register", "run", "measure_pipelined", "measure_rtt"]

_SEQ = struct.Struct("<Q")


def available() -> str:
    """Why the benchmark cannot run here, or ''."""
    if shutil.which("dpdk-testpmd") is None:
        return "dpdk-testpmd not found (apt-get install dpdk-dev librte-net-memif23)"
    if not glob.glob("/usr/lib/*/dpdk/pmds-*/librte_net_memif.so*"):
        return "librte_net_memif.so not found (apt-get install librte-net-memif23)"
    if not {0, 1} <= os.sched_getaffinity(0):
        return "needs CPUs 0 and 1 (testpmd on 1, this process on 0)"
    return ""


class _Testpmd:
    def __init__(self, workdir: str) -> None:
        self.sock = os.path.join(workdir, "bench.sock")
        self.prefix = f"amsgrbench{os.getpid()}"
        self.log = open(os.path.join(workdir, "testpmd.log"), "wb")
        cmd = ["dpdk-testpmd", "-l", "0,1", "--main-lcore", "0", "--no-pci", "--no-huge",
               "-m", "256", f"--file-prefix={self.prefix}",
               f"--vdev=net_memif0,role=server,socket={self.sock},socket-abstract=no",
               "--", "--forward-mode=io", "--port-topology=loop", "--auto-start",
               "--stats-period", "60", "--total-num-mbufs=8192"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        self.log.close()
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
        return rc


def measure_pipelined(iface: MemifInterface, duration: float, window: int,
                      size: int = 64, batch: int = 32) -> dict[str, Any]:
    """Frames/s with ``window`` in flight; checks sequence order of every frame."""
    frames = [bytearray(size) for _ in range(batch)]
    pack_into = _SEQ.pack_into
    unpack_from = _SEQ.unpack_from
    tx = iface.tx_burst
    rx = iface.rx_burst
    intr = iface.interrupt
    efd = iface.fileno()
    sent = recv = bad = 0
    t0 = time.perf_counter()
    stop_at = t0 + duration
    while True:
        room = window - (sent - recv)
        if room >= batch:
            for k in range(batch):
                pack_into(frames[k], 0, sent + k)
            sent += tx(frames)
        got = rx(256)
        if got:
            for f in got:
                if unpack_from(f, 0)[0] != recv:
                    bad += 1
                recv += 1
            if recv & 0x3FFF < len(got) and time.perf_counter() > stop_at:
                break
        elif intr and room < batch:
            select.select([efd], [], [], 0.01)
            iface.clear_interrupt()
        elif time.perf_counter() > stop_at + 1.0:
            break  # frames stopped coming back (lost): report what we have
    dt = time.perf_counter() - t0
    measured = recv
    # drain the tail so the next measurement starts clean (not counted: it came after dt)
    while sent > recv and (got := iface.rx_wait(0.05)):
        recv += len(got)
    return {"frames": measured, "seconds": round(dt, 3), "frames_per_s": round(measured / dt),
            "out_of_sequence": bad, "window": window, "frame_bytes": size}


def measure_rtt(iface: MemifInterface, count: int, size: int = 64) -> dict[str, Any]:
    """Round-trip times of ``count`` single frames: p50/p99/min in microseconds."""
    frame = bytearray(size)
    samples = []
    now = time.perf_counter_ns
    intr = iface.interrupt
    efd = iface.fileno()
    lost = 0
    for i in range(count):
        _SEQ.pack_into(frame, 0, i)
        t = now()
        iface.tx_burst([frame])
        deadline = t + 100_000_000
        while True:
            if intr:
                # interrupt mode proper: sleep on the eventfd *before* looking at the ring,
                # so every sample includes testpmd's kick and our wake-up
                select.select([efd], [], [], 0.1)
                iface.clear_interrupt()
            got = iface.rx_burst(8)
            if got or now() > deadline:
                break
        if not got:
            lost += 1
            continue
        samples.append((now() - t) / 1000.0)
    samples.sort()
    def pick(q: float) -> float:
        return round(samples[min(len(samples) - 1, int(q * len(samples)))], 2)
    return {"samples": len(samples), "lost": lost, "p50_us": pick(0.50), "p99_us": pick(0.99),
            "min_us": round(samples[0], 2)}


# -- Messenger over memif vs over posix ---------------------------------------------------

#: The Messenger rows. ``*-pinned`` rows put the server on CPU 1 and the client on CPU 0;
#: ``memif-poll`` busy-polls (MASK_INT set, an EventCenter poller per connection), which
#: needs a CPU per process, so it is always pinned and compared with ``tcp-pinned``.
MESSENGER_KINDS = ("memif", "memif-poll", "tcp", "tcp-pinned", "unix")
_SERVER_CPU, _CLIENT_CPU = 1, 0


def _stack(kind: str) -> Any:
    from transport.stacks import make_stack

    if kind.startswith("memif"):
        return make_stack("dpdk", memif_mode="poll" if kind == "memif-poll" else "interrupt")
    return make_stack("posix")


def _pin(kind: str, cpu: int) -> None:
    if kind in ("memif-poll", "tcp-pinned"):
        os.sched_setaffinity(0, {cpu})


def _serve_messenger(kind: str, addr: Any, ready: Callable[[], None]) -> None:

    _pin(kind, _SERVER_CPU)
    serve_messenger(addr, ready, stack=_stack(kind), name=f"bench-memif-server-{kind}")


def _client_run(kind: str, addr: Any, window: int, payload: bytes, duration: float,
                with_latency: bool) -> tuple[int, list[int], float]:
    """The Messenger client in a forked process: (requests, latencies ns, elapsed s)."""

    def client() -> list[Any]:
        _pin(kind, _CLIENT_CPU)
        lat: list[int] | None = [] if with_latency else None
        t0 = time.monotonic()
        n = messenger_client(addr, window, payload, duration, lat, stack=_stack(kind),
                             name=f"bench-memif-client-{kind}")
        return [n, lat or [], time.monotonic() - t0]

    n, lat, elapsed = ForkedCall(client, f"messenger client over {kind}").result()
    return int(n), list(lat), float(elapsed)


def measure_messenger(kind: str, workdir: str, payload_size: int, duration: float) -> dict[str, Any]:
    """One stack: server and client Messenger in two forked processes (pinned for the
    ``memif-poll`` and ``tcp-pinned`` rows, see ``_pin``)."""
    if kind.startswith("tcp"):
        import socket
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            addr: Any = ("127.0.0.1", probe.getsockname()[1])
    else:
        addr = os.path.join(workdir, f"msgr-{kind}.sock")
    pid = fork_server(lambda ready: _serve_messenger(kind, addr, ready),
                      f"messenger server over {kind}")
    payload = os.urandom(payload_size)
    try:
        _client_run(kind, addr, 16, payload, 0.3, False)  # warm-up
        n1, lat, t1 = _client_run(kind, addr, 1, payload, duration, True)
        cpu0 = proc_cpu(pid)
        n128, _, t128 = _client_run(kind, addr, 128, payload, duration, False)
        cpu1 = proc_cpu(pid)
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    return {"test": "messenger_echo", "stack": kind, "payload": payload_size,
            "rps_w1": round(n1 / t1), "rtt_p50_us": round(latency_us(lat, 0.5), 1),
            "rtt_p99_us": round(latency_us(lat, 0.99), 1),
            "rps_w128": round(n128 / t128),
            "server_cpu_us_per_req": round((cpu1 - cpu0) * 1e6 / max(1, n128), 1)}


_RATIOS = (("memif-poll", "tcp-pinned"), ("memif", "tcp"))


def run_messenger(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every kind for every payload, ``--messenger-repeat`` interleaved rounds; one
    ratio row per round and pair (ratios are only meaningful within one round)."""
    kinds = [k for k in args.messenger_stacks.split(",") if k]
    bad = sorted(set(kinds) - set(MESSENGER_KINDS))
    if bad:
        raise SystemExit(f"msgr bench memif: unknown --messenger-stacks {bad}; "
                         f"choose from {','.join(MESSENGER_KINDS)}")
    if any(k in ("memif-poll", "tcp-pinned") for k in kinds) and \
            not {_SERVER_CPU, _CLIENT_CPU} <= os.sched_getaffinity(0):
        raise SystemExit("msgr bench memif: pinned rows need CPUs 0 and 1")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="amsgr-bench-msgr-") as wd:
        for rnd in range(args.messenger_repeat):
            for size in (int(x) for x in args.payloads.split(",")):
                got: dict[str, dict[str, Any]] = {}
                for kind in kinds:
                    print(f"messenger over {kind} ({size} B, round {rnd})...", file=sys.stderr)
                    try:
                        row = measure_messenger(kind, wd, size, args.duration)
                    except Exception as err:  # noqa: BLE001 - reported in the results
                        row = {"test": "messenger_echo", "stack": kind, "payload": size,
                               "error": f"failed: {err}"}
                    row["round"] = rnd
                    rows.append(row)
                    if "rps_w128" in row:
                        got[kind] = row
                for a, b in _RATIOS:
                    if a in got and b in got:
                        rows.append({"test": "ratio", "round": rnd, "payload": size,
                                     "pair": f"{a}/{b}",
                                     "rps_w1": round(got[a]["rps_w1"] / got[b]["rps_w1"], 2),
                                     "rps_w128": round(got[a]["rps_w128"] / got[b]["rps_w128"], 2)})
    _print_messenger_table(rows)
    return rows


def _print_messenger_table(rows: list[dict[str, Any]]) -> None:
    med = statistics.median_high
    echo = [r for r in rows if r.get("test") == "messenger_echo" and "rps_w1" in r]
    print("\nMessenger echo, medians over rounds (server CPU of a busy-polling server "
          "counts its spinning)", file=sys.stderr)
    print(f"  {'stack':12s} {'B':>5s} {'req/s w1':>9s} {'p50 us':>7s} {'p99 us':>7s} "
          f"{'req/s w128':>10s} {'srv cpu us/req':>14s}", file=sys.stderr)
    for key in sorted({(r["payload"], r["stack"]) for r in echo}):
        rs = [r for r in echo if (r["payload"], r["stack"]) == key]
        print(f"  {key[1]:12s} {key[0]:5d} {med([r['rps_w1'] for r in rs]):9,.0f} "
              f"{med([r['rtt_p50_us'] for r in rs]):7.1f} {med([r['rtt_p99_us'] for r in rs]):7.1f} "
              f"{med([r['rps_w128'] for r in rs]):10,.0f} "
              f"{med([r['server_cpu_us_per_req'] for r in rs]):14.1f}", file=sys.stderr)
    ratios = [r for r in rows if r.get("test") == "ratio"]
    for key in sorted({(r["payload"], r["pair"]) for r in ratios}):
        rs = [r for r in ratios if (r["payload"], r["pair"]) == key]
        print(f"  ratio {key[1]} {key[0]} B: w1 {[r['rps_w1'] for r in rs]} "
              f"w128 {[r['rps_w128'] for r in rs]} (per round)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if args.messenger_only:
        return _report(args, run_messenger(args), None)
    why = available()
    if why:
        print(f"msgr bench memif: {why}", file=sys.stderr)
        return 2
    if args.reserve_hugepages:
        # explicit and root-only; the old nr_hugepages is restored on exit
        with reserved_hugepages(args.reserve_hugepages) as got:
            print(f"reserved {got} hugepages for the run", file=sys.stderr)
            return _run(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    old_aff = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="amsgr-bench-memif-") as wd:
        pmd = _Testpmd(wd)
        try:
            for mode in args.modes.split(","):
                intr = mode == "interrupt"
                cfg = MemifConfig(interrupt=intr, hugepages=not args.no_hugepages)
                t = time.perf_counter()
                with connect(pmd.sock, cfg, timeout=30.0) as iface:
                    hs = time.perf_counter() - t
                    iface.warm_up()
                    window = min(args.window, iface.ring_size() - 32)
                    for rep in range(args.repeat):
                        r = measure_pipelined(iface, args.duration, window)
                        rows.append({"peer": "dpdk-testpmd", "test": "pipelined", "mode": mode,
                                     "rep": rep, "hugepage_region": iface.hugetlb, **r})
                        print(f"pipelined {mode:9s} rep {rep}: {r['frames_per_s']:>9,} frames/s "
                              f"({r['out_of_sequence']} out of sequence)", file=sys.stderr)
                    r = measure_rtt(iface, args.rtt_count)
                    rows.append({"peer": "dpdk-testpmd", "test": "rtt", "mode": mode,
                                 "connect_s": round(hs, 4), **r})
                    print(f"rtt       {mode:9s}: p50 {r['p50_us']} us  p99 {r['p99_us']} us",
                          file=sys.stderr)
        finally:
            rc = pmd.stop()
            os.sched_setaffinity(0, old_aff)
    if args.messenger:
        rows += run_messenger(args)
    return _report(args, rows, rc)


def _report(args: argparse.Namespace, rows: list[dict[str, Any]], rc: int | None) -> int:
    meta = {"kernel": os.uname().release, "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "duration_s": args.duration, "testpmd_exit": rc, "hugepages": hugepage_info(),
            "loadavg_after": os.getloadavg(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``memif`` subcommand to ``msgr bench``'s subparsers."""
    p = subparsers.add_parser("memif", help="memif client vs dpdk-testpmd: frames/s, RTT")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per pipelined run")
    p.add_argument("--repeat", type=int, default=3, help="pipelined runs per mode")
    p.add_argument("--rtt-count", type=int, default=2000, help="round trips per mode")
    p.add_argument("--window", type=int, default=992, help="frames in flight (≤ ring − 32, trap 3)")
    p.add_argument("--modes", default="busy-poll,interrupt")
    p.add_argument("--no-hugepages", action="store_true", help="plain memfd region")
    p.add_argument("--reserve-hugepages", type=int, default=0, metavar="N",
                   help="root: reserve N more 2 MiB pages for the run, restore after")
    p.add_argument("--messenger", action="store_true",
                   help="also: Messenger echo over memif vs TCP vs Unix (two processes)")
    p.add_argument("--messenger-only", action="store_true", help="only the Messenger part")
    p.add_argument("--payloads", default="64,4096", help="Messenger payload sizes")
    p.add_argument("--messenger-stacks", default=",".join(MESSENGER_KINDS),
                   help="Messenger rows, comma-separated (memif = interrupt mode)")
    p.add_argument("--messenger-repeat", type=int, default=1,
                   help="interleaved rounds of every Messenger row")
    p.set_defaults(func=run)
