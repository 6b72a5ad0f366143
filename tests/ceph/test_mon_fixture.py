"""The ceph_mon fixture itself: a real mon, reachable, restartable, stopped by pid."""

from __future__ import annotations

import os
import socket
import subprocess

from tests.ceph.mon import BANNER, CephMon, require_ceph


def test_mon_answers_with_a_msgr2_banner(ceph_mon: CephMon) -> None:
    with socket.create_connection(("127.0.0.1", ceph_mon.port), timeout=5) as s:
        s.settimeout(5)
        got = b""
        while len(got) < 26:
            chunk = s.recv(26 - len(got))
            assert chunk, "mon closed before sending its banner"
            got += chunk
    assert got.startswith(BANNER)
    # supported = REVISION_1 only (Pacific), required = 0
    assert got[8:] == bytes.fromhex("1000" "0100000000000000" "0000000000000000")


def test_ceph_cli_sees_a_healthy_mon(ceph_mon: CephMon) -> None:
    res = subprocess.run(["ceph", "-c", str(ceph_mon.conf), "--connect-timeout", "10",
                          "-s", "--format", "json"], capture_output=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert b"HEALTH_OK" in res.stdout and str(ceph_mon.fsid).encode() in res.stdout


def test_restart_keeps_port_and_data(fresh_mon: CephMon) -> None:
    assert fresh_mon.proc is not None
    old = fresh_mon.proc.pid
    fresh_mon.restart()
    assert fresh_mon.proc is not None and fresh_mon.proc.pid != old
    assert not os.path.exists(f"/proc/{old}")
    res = subprocess.run(["ceph", "-c", str(fresh_mon.conf), "--connect-timeout", "10",
                          "fsid"], capture_output=True, timeout=60, check=False)
    assert res.stdout.strip().decode() == str(fresh_mon.fsid)


def test_stop_by_pid(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path
    require_ceph()
    mon = CephMon(Path(tmp_path))
    mon.bootstrap()
    mon.start()
    assert mon.proc is not None
    pid = mon.proc.pid
    mon.stop()
    assert mon.proc is None and not os.path.exists(f"/proc/{pid}")
