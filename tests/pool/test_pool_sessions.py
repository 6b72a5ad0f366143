"""Lossless sessions against a real pool: real `msgr serve` supervisor and worker
processes, the Messenger echo app, verified traffic from `msgr stress`'s engine.

These prove the session side of the pool: reconnects that land on the wrong worker are
routed to the owner; scale-down migrates live sessions; a killed worker's clients are told
(remote reset), everyone else is untouched."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool.supervisor.admin import AdminClient, AdminError
from tools.stress.echo import StressConfig, StressResult, run_stress
from transport import shmname

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pool:
    def __init__(self, tmp: Path, workers: int, accept: str, *extra: str) -> None:
        self.port = _free_port()
        self.admin = str(tmp / "admin.sock")
        self.log = open(tmp / "serve.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "serve", "--bind", f"127.0.0.1:{self.port}",
             "--workers", str(workers), "--accept", accept, "--admin", self.admin, *extra],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_accepting(workers)

    def status(self) -> dict:
        return AdminClient(self.admin).call("status")

    def wait_accepting(self, n: int, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                last = self.status()
                if last.get("accepting") == n and all(
                        w["state"] in ("ACCEPTING", "EXITED") for w in last["workers"]):
                    return last
            except (OSError, AdminError):
                pass
            time.sleep(0.05)  # polling the pool's status with a deadline
        raise AssertionError(f"not {n} accepting within {timeout}s: {last}\n{self.output()}")

    def scale(self, n: int) -> None:
        subprocess.run([sys.executable, "-m", "tools.cli", "scale", str(n), "--admin",
                        self.admin], check=True, timeout=60)
        self.wait_accepting(n)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                AdminClient(self.admin).call("stop")
            except (OSError, AdminError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator:
    pools: list[Pool] = []

    def make(workers: int, accept: str = "processor", *extra: str) -> Pool:
        p = Pool(tmp_path, workers, accept, *extra)
        pools.append(p)
        return p

    yield make
    for p in pools:
        p.stop()
    assert not [s for s in shmname.list_segments()
                if shmname.owner_of(s) in {p.proc.pid for p in pools}], "segment left behind"


def _stress_in_thread(cfg: StressConfig) -> tuple[threading.Thread, list[StressResult]]:
    out: list[StressResult] = []
    t = threading.Thread(target=lambda: out.append(run_stress(cfg)), daemon=True)
    t.start()
    return t, out


def test_lossless_across_workers_with_injected_failures(make_pool) -> None:
    """Reconnects land on any of 4 workers (least-loaded choice); the non-owners hand
    them to the owner, so no session is ever reset."""
    pool = make_pool(4, "processor", "--inject-socket-failures", "50")
    r = run_stress(StressConfig(target=("127.0.0.1", pool.port), conns=8, messages=6000,
                                inject_socket_failures=50, size_max=8192, seed=1))
    assert r.ok, r
    assert r.session_resets == 0 and r.forgiven == 0
    assert r.injected_failures > 10 and r.reconnects > 10
    st = pool.status()
    assert sum(w["msgs_in"] for w in st["workers"]) >= 6000
    perf = AdminClient(pool.admin).call("perf")
    assert perf["supervisor"]["relayed"] > 0, "no reconnect needed routing to its owner"


@pytest.mark.parametrize("accept", ["processor", "reuseport"])
def test_scale_under_load_loses_and_resets_nothing(make_pool, accept: str) -> None:
    pool = make_pool(2, accept)
    cfg = StressConfig(target=("127.0.0.1", pool.port), conns=12, messages=0, duration=8.0,
                       size_max=2048, seed=2)
    thread, out = _stress_in_thread(cfg)
    for n in (4, 1, 3):
        pool.scale(n)
    thread.join(timeout=120)
    assert not thread.is_alive()
    r = out[0]
    assert r.ok, r
    assert r.sent > 1000
    assert (r.session_resets, r.connection_resets, r.connection_refused, r.forgiven) == \
        (0, 0, 0, 0), r
    assert pool.status()["accepting"] == 3


def test_sigkill_worker_resets_only_its_sessions(make_pool) -> None:
    pool = make_pool(2)
    cfg = StressConfig(target=("127.0.0.1", pool.port), conns=10, messages=0, duration=5.0,
                       seed=3)
    thread, out = _stress_in_thread(cfg)
    deadline = time.monotonic() + 10
    while True:  # wait until every session is connected and both workers own some
        st = pool.status()
        live = [w for w in st["workers"] if w["state"] == "ACCEPTING"]
        # all of them, or the victim may gain sessions after its count is read below
        if all(w["connections"] > 0 for w in live) and \
                sum(w["connections"] for w in live) >= cfg.conns:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    victim = next(w for w in st["workers"] if w["slot"] == 1)
    killed_conns = victim["connections"]
    t0 = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while True:
        st = pool.status()
        w1 = next(w for w in st["workers"] if w["slot"] == 1)
        if w1["state"] == "ACCEPTING" and w1["pid"] != victim["pid"]:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.02)
    replaced_in = time.monotonic() - t0
    thread.join(timeout=60)
    r = out[0]
    assert replaced_in < 2.0, replaced_in
    assert w1["restarts"] == 1
    assert r.ok, r  # nothing silently lost: only forgiven after a reset notification
    assert 1 <= r.session_resets <= killed_conns, (r.session_resets, killed_conns)


def test_bounded_chaos_run(make_pool) -> None:
    """The CI-sized version of `msgr stress --duration 600` long mode: socket failures at
    1/30 on both sides, a worker SIGKILLed every 3 s, the pool rescaled every 4 s. No
    silent loss (only forgiveness after a reset notification), no duplicate, no reorder,
    and the pool is back to N at the end."""
    from tools.stress.common import ChaosConfig

    pool = make_pool(3, "processor", "--inject-socket-failures", "30")
    r = run_stress(StressConfig(
        target=("127.0.0.1", pool.port), conns=10, messages=0, duration=12.0,
        inject_socket_failures=30, seed=21,
        chaos=ChaosConfig(pool.admin, kill_every=3.0, scale_every=4.0, scale_min=2,
                          scale_max=4, final_workers=3)))
    assert r.ok, r
    assert (r.lost, r.duplicated, r.reordered, r.corrupted) == (0, 0, 0, 0), r
    assert r.chaos_kills >= 2 and r.chaos_scales >= 2, r
    assert r.pool_back_to_n is True
    assert r.received > 500, r
    st = pool.wait_accepting(3)
    assert sum(w["restarts"] for w in st["workers"]) >= 1


def test_supervisor_sigkill_under_load_leaves_nothing(tmp_path: Path) -> None:
    """SIGKILL of the supervisor while sessions are busy: its workers exit within 2 s by
    themselves (PDEATHSIG / control-channel EOF), and the next start sweeps the dead
    pool's shared memory: no process or segment of the old pool remains."""
    pool = Pool(tmp_path, 2, "processor")
    page = pool.status()["control_page"]
    cfg = StressConfig(target=("127.0.0.1", pool.port), conns=6, messages=0, duration=3.0,
                       timeout=2.0, seed=31, max_backoff=0.2)
    thread, out = _stress_in_thread(cfg)
    try:
        deadline = time.monotonic() + 10
        while sum(w["msgs_in"] for w in pool.status()["workers"]) < 500:
            assert time.monotonic() < deadline, "no load reached the pool"
            time.sleep(0.02)  # polling the pool's counters, bounded
        pids = [w["pid"] for w in pool.status()["workers"] if w["pid"]]
        os.kill(pool.proc.pid, signal.SIGKILL)
        pool.proc.wait(timeout=5)
        t0 = time.monotonic()
        while any(os.path.exists(f"/proc/{p}") for p in pids):
            assert time.monotonic() - t0 < 2.0, "workers outlived their supervisor by 2 s"
            time.sleep(0.01)  # polling /proc, bounded
        assert page in shmname.list_segments()  # SIGKILL skipped the unlink...
    finally:
        thread.join(timeout=60)
        pool.log.close()
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    again = Pool(again_dir, 1, "processor")
    try:
        assert page not in shmname.list_segments()  # ...and the next start swept it
    finally:
        again.stop()
