"""Invariant 4 on a live pool: 10,000 malformed, truncated, oversized and random byte
streams each fault only their own connection. No worker restarts, a verified stress run
beside them is unaffected, and the workers' fd counts stay flat."""

from __future__ import annotations

import os
import random
import time
import socket
import struct
import threading
from pathlib import Path

import pytest

from pool.admin import AdminClient
from protocol.control import EntityAddr, Hello, encode_control
from protocol.crc import crc32c as raw_crc
from protocol.frames import Tag, encode_banner, frame_bytes
from tests.pool.test_pool_sessions import Pool
from tools.stress import StressConfig, StressResult, run_stress

pytestmark = pytest.mark.slow

STREAMS = 10_000


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _hostile(rng: random.Random, i: int) -> bytes:
    banner = encode_banner(1, 0)
    hello = b"".join(bytes(b) for b in encode_control(Hello(8, EntityAddr(1, "x", 1))))
    kind = i % 6
    if kind == 0:
        return rng.randbytes(rng.randint(1, 600))                      # random
    if kind == 1:
        return (banner + hello)[:rng.randint(1, len(banner + hello) - 1)]  # truncated
    if kind == 2:
        # A preamble announcing a 1 GiB segment, with a *valid* crc: must be refused
        # before anything is allocated.
        body = struct.pack("<BBIHIHIHIHBB", Tag.HELLO, 1, 1 << 30, 8, 0, 0, 0, 0, 0, 0, 0, 0)
        return banner + body + struct.pack("<I", raw_crc(body, 0))
    if kind == 3:
        bad = bytearray(banner + hello)
        bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)           # one bit flipped
        return bytes(bad)
    if kind == 4:
        return b"ceph v027" + rng.randbytes(20)                          # msgr1 peer
    return banner + frame_bytes(Tag.MESSAGE, [rng.randbytes(32)])      # message too early


def test_ten_thousand_hostile_streams_fault_only_themselves(tmp_path: Path) -> None:
    pool = Pool(tmp_path, 2, "processor")
    try:
        before = pool.status()["workers"]
        pids = [w["pid"] for w in before if w["state"] == "ACCEPTING"]
        fds_before = {pid: _fd_count(pid) for pid in pids}
        cfg = StressConfig(target=("127.0.0.1", pool.port), conns=4, messages=0,
                           duration=1e9, seed=9)
        stop = threading.Event()
        out: list[StressResult] = []
        thread = threading.Thread(target=lambda: out.append(run_stress(cfg, stop.is_set)),
                                  daemon=True)
        thread.start()
        rng = random.Random(1234)
        addr = ("127.0.0.1", pool.port)
        for i in range(STREAMS):
            s = socket.create_connection(addr)
            s.sendall(_hostile(rng, i))
            s.close()
        stop.set()
        thread.join(timeout=120)
        r = out[0]
        assert r.ok and r.received > 100, r
        assert r.session_resets == 0 and r.connection_resets == 0, r
        deadline = time.monotonic() + 30
        while True:  # every hostile connection reached the Processor and a worker
            perf = AdminClient(pool.admin).call("perf")
            if perf["processor"]["assigned"] >= STREAMS:
                break
            assert time.monotonic() < deadline, perf["processor"]
            time.sleep(0.1)  # polling the pool's counters, bounded
        after = pool.status()["workers"]
        assert [w["restarts"] for w in after] == [w["restarts"] for w in before]
        assert [w["pid"] for w in after if w["state"] == "ACCEPTING"] == pids
        # All hostile connections are gone by now or within the handshake timeout; fds
        # come back to where they were (allow the 4 stress sessions to be on either side).
        deadline = time.monotonic() + 15
        while True:
            fds = {pid: _fd_count(pid) for pid in pids}
            if all(fds[p] <= fds_before[p] + 4 for p in pids):
                break
            assert time.monotonic() < deadline, (fds_before, fds)
            time.sleep(0.1)  # polling /proc for the kernel to finish closing, bounded
    finally:
        pool.stop()
