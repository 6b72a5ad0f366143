"""Across hosts: three network namespaces joined by veth pairs (a pool in one, `msgr
stress` clients in the other two). The link of one client is cut for 2 s and restored
while traffic runs: its lossless sessions resume and nothing is lost.

Needs root and iproute2 (CI runs as root); skips with the reason elsewhere. All addresses
live in namespaces this test creates (10.231.x.0/24), and it deletes them afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed (.ci/system-deps installs it)"
    probe = f"amsgrp{uuid.uuid4().hex[:6]}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def hosts() -> Iterator[dict[str, str]]:
    why = _why_not()
    if why:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:5]
    ns = {"srv": f"amsgrs{tag}", "c1": f"amsgra{tag}", "c2": f"amsgrb{tag}"}
    created: list[str] = []
    try:
        for name in ns.values():
            _ip("netns", "add", name)
            created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        for i, client in enumerate(("c1", "c2"), start=1):
            a, b = f"vs{i}{tag}", f"vc{i}{tag}"
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", ns["srv"])
            _ip("link", "set", b, "netns", ns[client])
            _ip("-n", ns["srv"], "addr", "add", f"10.231.{i}.1/24", "dev", a)
            _ip("-n", ns[client], "addr", "add", f"10.231.{i}.2/24", "dev", b)
            _ip("-n", ns["srv"], "link", "set", a, "up")
            _ip("-n", ns[client], "link", "set", b, "up")
        ns["c1_link"] = f"vc1{tag}"
        yield ns
    finally:
        for name in created:
            _ip("netns", "del", name, check=False)  # deleting a netns removes its veths


def _in(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def test_link_cut_between_hosts_loses_nothing(hosts: dict[str, str], tmp_path: Path) -> None:
    admin = str(tmp_path / "admin.sock")
    log = open(tmp_path / "serve.log", "w")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    serve = subprocess.Popen(_in(hosts["srv"], sys.executable, "-m", "tools.cli", "serve",
                                 "--bind", "0.0.0.0:6800", "--workers", "2", "--admin", admin),
                             stdout=log, stderr=subprocess.STDOUT, env=env)
    clients: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(admin):
            assert serve.poll() is None and time.monotonic() < deadline, "pool did not start"
            time.sleep(0.05)  # waiting for the pool's socket file, bounded
        for i, client in enumerate(("c1", "c2"), start=1):
            clients.append(subprocess.Popen(
                _in(hosts[client], sys.executable, "-m", "tools.cli", "stress",
                    "--target", f"10.231.{i}.1:6800", "--conns", "4", "--messages", "0",
                    "--duration", "8", "--timeout", "60", "--json",
                    str(tmp_path / f"{client}.json")), env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(2)  # traffic flows before the cut (a fault schedule, not synchronisation)
        _ip("-n", hosts["c1"], "link", "set", hosts["c1_link"], "down")
        time.sleep(2)  # the link stays cut for 2 s, as the issue specifies
        _ip("-n", hosts["c1"], "link", "set", hosts["c1_link"], "up")
        codes = [c.wait(timeout=120) for c in clients]
        results = [json.loads((tmp_path / f"{c}.json").read_text()) for c in ("c1", "c2")]
        for r in results:
            assert r["ok"] and r["lost"] == 0 and r["duplicated"] == 0, r
            assert r["reordered"] == 0 and r["corrupted"] == 0, r
            assert r["session_resets"] == 0 and r["received"] > 100, r
        assert codes == [0, 0]
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
        subprocess.run(_in(hosts["srv"], sys.executable, "-m", "tools.cli", "stop", "--admin",
                           admin), env=env, capture_output=True, timeout=60)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        log.close()
