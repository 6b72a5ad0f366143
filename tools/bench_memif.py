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

The Messenger-over-memif vs Messenger-over-TCP comparison of issue 7 is not measured
here: it needs ``--stack dpdk`` in the pool (TODO, see BENCHMARKS_memif.md).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

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


def _rx(iface: MemifInterface, timeout: float) -> list:
    """Frames, waiting up to ``timeout`` (select on the eventfd in interrupt mode)."""
    end = time.perf_counter() + timeout
    while True:
        got = iface.rx_burst(256)
        if got or time.perf_counter() > end:
            return got
        if iface.interrupt:
            select.select([iface.fileno()], [], [], 0.01)
            iface.clear_interrupt()


def _warm_up(iface: MemifInterface) -> None:
    marker = b"\xff" * 64
    end = time.monotonic() + 10
    while time.monotonic() < end:
        iface.tx_burst([marker])
        if any(bytes(f) == marker for f in _rx(iface, 0.05)):
            while _rx(iface, 0.05):
                pass
            return
    raise RuntimeError("testpmd never returned the warm-up frame")


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
    # drain the tail so the next measurement starts clean
    while sent > recv and _rx(iface, 0.05):
        recv += len(iface.rx_burst(256))
    return {"frames": recv, "seconds": round(dt, 3), "frames_per_s": round(recv / dt),
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
            got = iface.rx_burst(8)
            if got:
                break
            if intr:
                select.select([efd], [], [], 0.1)
                iface.clear_interrupt()
            if now() > deadline:
                break
        if not got:
            lost += 1
            continue
        samples.append((now() - t) / 1000.0)
    samples.sort()
    pick = lambda q: round(samples[min(len(samples) - 1, int(q * len(samples)))], 2)  # noqa: E731
    return {"samples": len(samples), "lost": lost, "p50_us": pick(0.50), "p99_us": pick(0.99),
            "min_us": round(samples[0], 2)}


def run(args: argparse.Namespace) -> int:
    why = available()
    if why:
        print(f"msgr bench memif: {why}", file=sys.stderr)
        return 2
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
                    _warm_up(iface)
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
    meta = {"kernel": os.uname().release, "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "duration_s": args.duration, "testpmd_exit": rc,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "messenger_over_memif": "TODO: needs the pool's --stack dpdk (not measured)"}
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
    p.set_defaults(func=run)
