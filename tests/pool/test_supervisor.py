"""Real supervisors and real worker processes (``msgr serve`` children), observed through
the admin socket, /proc and client sockets. Every wait is a poll with a deadline."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from transport import shmname

from .support import Load, Pool, connect, echo, msgr, proc_alive, running_pool, wait_for

pytestmark = pytest.mark.timeout(90)


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


@pytest.mark.parametrize("accept", ["processor", "reuseport"])
def test_both_accept_modes_serve_n_workers(tmp_path: Path, accept: str) -> None:
    with running_pool(tmp_path, 3, accept=accept) as pool:
        st = pool.status()
        assert st["accept"] == accept and st["desired"] == 3
        assert comm(pool.proc.pid) == "msgr supervisor"
        for w in st["workers"]:
            assert {"slot", "pid", "state", "connections", "restarts"} <= set(w)
            assert comm(w["pid"]) == f"msgr worker {w['slot']}"
        socks = [connect(pool.port) for _ in range(12)]
        try:
            for i, s in enumerate(socks):
                echo(s, b"ping %d" % i * 100)
            served = wait_for(lambda: [w for w in pool.status()["workers"] if w["msgs_in"] > 0]
                              if sum(w["connections"] for w in pool.status()["workers"]) == 12 else None,
                              5, "12 live connections")
            if accept == "processor":
                assert len(served) == 3  # least-loaded assignment reaches every worker
        finally:
            for s in socks:
                s.close()
        pids = pool.worker_pids()
    for pid in pids:
        assert not proc_alive(pid)


def test_processor_spreads_40_connections_evenly(tmp_path: Path) -> None:
    with running_pool(tmp_path, 3) as pool:
        socks = []
        try:
            for i in range(40):
                s = connect(pool.port)
                socks.append(s)
                echo(s, b"x%d" % i)
            def counted() -> list[int] | None:
                c = [w["connections"] for w in pool.status()["workers"]]
                return c if sum(c) == 40 else None

            counts = wait_for(counted, 5, "40 connections counted")
            assert max(counts) - min(counts) <= 1, counts
        finally:
            for s in socks:
                s.close()


def _listening_inodes(port: int) -> set[str]:
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    out.add(parts[9])
    return out


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


def test_reuseport_listeners_are_distinct_sockets(tmp_path: Path) -> None:
    with running_pool(tmp_path, 3, accept="reuseport") as pool:
        listening = _listening_inodes(pool.port)
        assert len(listening) == 3, listening
        per_worker = [(_socket_inodes(pid) & listening) for pid in pool.worker_pids()]
        assert all(len(s) == 1 for s in per_worker), per_worker
        assert len(set.union(*per_worker)) == 3  # one distinct listener per worker
        # The supervisor holds every listener, so no worker exit is a listener's last close.
        assert _socket_inodes(pool.proc.pid) >= listening


@pytest.mark.parametrize("accept", ["processor", "reuseport"])
def test_scale_2_4_1_3_under_load_without_resets(tmp_path: Path, accept: str) -> None:
    with running_pool(tmp_path, 2, accept=accept) as pool:
        with Load(pool.port, persistent=4) as load:
            wait_for(lambda: load.echoes > 200, 10, "load running")
            for n in (4, 1, 3):
                before = load.echoes
                r = msgr("scale", str(n), "--admin", pool.admin)
                assert r.returncode == 0, r.stderr + pool.log()
                st = pool.status()
                assert [w["state"] for w in st["workers"]].count("ACCEPTING") == n
                assert {w["state"] for w in st["workers"]} <= {"ACCEPTING", "EXITED"}
                wait_for(lambda b=before: load.echoes > b + 100, 10, f"traffic after scaling to {n}")
        summary = load.summary()
        assert summary["resets"] == 0 and summary["refused"] == 0 and not summary["errors"], summary
        assert summary["new_conns"] > 0
        if accept == "processor":
            assert pool.client.call("perf")["supervisor"]["relayed"] > 0  # connections migrated


def test_sigkill_worker_is_replaced_quickly(tmp_path: Path) -> None:
    with running_pool(tmp_path, 2) as pool:
        victim = pool.status()["workers"][0]
        t0 = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)

        def replaced() -> bool:
            w = pool.status()["workers"][0]
            return w["state"] == "ACCEPTING" and w["pid"] != victim["pid"]

        wait_for(replaced, 2.0, "slot 0 replaced")
        assert time.monotonic() - t0 < 2.0
        w = pool.status()["workers"][0]
        assert w["restarts"] == 1 and w["last_exit"] == -signal.SIGKILL
        with connect(pool.port) as s:
            echo(s, b"still serving")


@pytest.mark.parametrize("ignore_abort", [False, True], ids=["abort-dumps", "abort-ignored"])
def test_hung_worker_is_killed_by_heartbeat_and_replaced(tmp_path: Path, ignore_abort: bool) -> None:
    marker = tmp_path / "hung-once"
    cfg = json.dumps({"hang_after": 0.3, "hang_once_file": str(marker), "ignore_sigabrt": ignore_abort})
    extra = ("--heartbeat-timeout", "1.5", "--app-config", cfg)
    with running_pool(tmp_path, 2, extra=extra) as pool:
        wait_for(marker.exists, 5, "a worker to hang")

        def recovered() -> bool:
            st = pool.status()
            return sum(w["restarts"] for w in st["workers"]) == 1 and \
                [w["state"] for w in st["workers"]].count("ACCEPTING") == 2

        wait_for(recovered, 10, "the hung worker replaced")
        log = pool.log()
        assert "missed its heartbeat deadline" in log and "SIGABRT" in log
        if ignore_abort:  # stage two
            assert "after SIGABRT: SIGKILL" in log
            assert [w["last_exit"] for w in pool.status()["workers"]].count(-signal.SIGKILL) == 1
        else:  # stage one: faulthandler's stack dump, then the abort ends it
            assert "Fatal Python error: Aborted" in log and "SIGKILL" not in log
        assert pool.client.call("perf")["supervisor"]["heartbeat_kills"] == 1


def test_boot_failures_trip_flap_guard(tmp_path: Path) -> None:
    # Slot 1 cannot start: it goes FAILED, the pool keeps serving with slot 0.
    with running_pool(tmp_path, 1, app="tests.pool.support:FailingApp",
                      env={"MSGR_TEST_FAIL_SLOTS": "1"}) as pool:
        r = msgr("scale", "2", "--admin", pool.admin, "--no-wait")
        assert r.returncode == 0, r.stderr

        def failed() -> dict | None:  # type: ignore[type-arg]
            ws = {w["slot"]: w for w in pool.status()["workers"]}
            return ws if 1 in ws and ws[1]["state"] == "FAILED" else None

        ws = wait_for(failed, 10, "slot 1 FAILED")
        assert ws[0]["state"] == "ACCEPTING" and ws[1]["restarts"] == 2
        assert "giving up on this slot" in pool.log()
    # No slot can start: the supervisor gives up with a non-zero status and cleans up.
    pool = Pool(tmp_path, 2, app="tests.pool.support:FailingApp", env={"MSGR_TEST_FAIL_SLOTS": "all"})
    try:
        rc = pool.proc.wait(20)
    finally:
        pool._log.close()
    assert rc == 3, pool.log()
    log = pool.log()
    assert "FAILED" in log and "no worker can be kept alive" in log
    assert not os.path.exists(pool.admin)


def test_drain_deadline_kills_a_worker_that_never_drains(tmp_path: Path) -> None:
    extra = ("--drain-timeout", "0.5", "--app-config", json.dumps({"never_drain": True}))
    with running_pool(tmp_path, 2, extra=extra) as pool:
        r = msgr("scale", "1", "--admin", pool.admin)
        assert r.returncode == 0, r.stderr
        ws = pool.status()["workers"]
        assert [w["state"] for w in ws] == ["ACCEPTING", "EXITED"]
        assert ws[1]["last_exit"] == -signal.SIGKILL and ws[1]["restarts"] == 0
        assert "did not finish draining in 0.5s: SIGKILL" in pool.log()


@pytest.mark.parametrize("how", ["msgr stop", "SIGTERM", "SIGINT"])
def test_clean_stop_leaves_nothing(tmp_path: Path, how: str) -> None:
    pool = Pool(tmp_path, 2)
    try:
        st = pool.wait_accepting(2)
        pids = [w["pid"] for w in st["workers"]]
        page = st["control_page"]
        assert page in shmname.list_segments()
        if how == "msgr stop":
            r = msgr("stop", "--admin", pool.admin)
            assert r.returncode == 0, r.stderr
            # `msgr stop` returns only when the pool is gone.
            assert not os.path.exists(pool.admin) and page not in shmname.list_segments()
        else:
            pool.proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
        assert pool.proc.wait(15) == 0
    finally:
        if pool.proc.poll() is None:
            pool.kill_all()
        pool._log.close()
    assert not os.path.exists(pool.admin)
    assert page not in shmname.list_segments()
    assert not any(proc_alive(p) for p in pids)
    assert "stopped (exit status 0)" in pool.log()


def test_supervisor_sigkill_workers_exit_and_next_serve_sweeps(tmp_path: Path) -> None:
    pool = Pool(tmp_path, 2)
    try:
        st = pool.wait_accepting(2)
        pids = [w["pid"] for w in st["workers"]]
        page = st["control_page"]
        os.kill(pool.proc.pid, signal.SIGKILL)
        pool.proc.wait(5)
        wait_for(lambda: not any(proc_alive(p) for p in pids), 2.0, "orphaned workers to exit")
        assert page in shmname.list_segments()  # SIGKILL skipped the unlink...
    finally:
        if pool.proc.poll() is None:
            pool.kill_all()
        pool._log.close()
    with running_pool(tmp_path, 1) as again:  # ...and the next start sweeps it
        assert page not in shmname.list_segments()
        assert f"removed 1 segment(s) of dead pools: {page}" in again.log()


def test_signals_ttin_ttou_scale_by_one(tmp_path: Path) -> None:
    with running_pool(tmp_path, 2) as pool:
        pool.proc.send_signal(signal.SIGTTIN)
        pool.wait_accepting(3)
        # Standard signals do not queue (signal(7)): a second SIGTTOU sent before the
        # first was handled would merge with it, so wait for each to take effect.
        for n in (2, 1):
            pool.proc.send_signal(signal.SIGTTOU)
            wait_for(lambda n=n: pool.status()["desired"] == n, 5, f"desired {n}")
        pool.wait_accepting(1)
        pool.proc.send_signal(signal.SIGTTOU)  # never below one
        assert pool.status()["desired"] == 1


def test_spawn_start_method(tmp_path: Path) -> None:
    with running_pool(tmp_path, 2, extra=("--start-method", "spawn")) as pool:
        with connect(pool.port) as s:
            echo(s, b"spawned")
        r = msgr("scale", "1", "--admin", pool.admin)
        assert r.returncode == 0, r.stderr


def test_admin_rejects_bad_scale_and_survives(tmp_path: Path) -> None:
    with running_pool(tmp_path, 1) as pool:
        for bad in (0, -1, 10_000, "3", True):
            reply = pool.client.call("scale", check=False, n=bad)
            assert reply["ok"] is False and "integer 1..64" in reply["error"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(pool.admin)
            s.sendall(b"\x7f\xff\xff\xff garbage")
        assert pool.status()["accepting"] == 1
