"""``msgr ceph status|command|ping`` end to end against a real ceph-mon, as a user runs it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ceph.mon import CephMon, free_port, running_mon
from tests.pool.support import msgr


def test_status_prints_the_mons_status_json(ceph_mon: CephMon) -> None:
    r = msgr("ceph", "status", "--mon", ceph_mon.addr)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["fsid"] == str(ceph_mon.fsid)
    assert status["health"]["status"] == "HEALTH_OK"
    assert status["quorum_names"] == ["a"]


def test_command_prints_result_code_status_and_output(ceph_mon: CephMon) -> None:
    r = msgr("ceph", "command", "--mon", ceph_mon.addr, '{"prefix": "mon dump", "format": "json"}')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "r = 0" and lines[1] == "rs = dumped monmap epoch 1"
    assert json.loads("\n".join(lines[2:]))["fsid"] == str(ceph_mon.fsid)
    bad = msgr("ceph", "command", "--mon", ceph_mon.addr, '{"prefix": "osd pool get", "pool": "x",'
               ' "var": "size"}')
    assert bad.returncode == 1 and bad.stdout.startswith("r = -")


def test_ping_times_mping_round_trips(ceph_mon: CephMon) -> None:
    r = msgr("ceph", "ping", "--mon", ceph_mon.addr, "--count", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"mon.a at {ceph_mon.addr}: HEALTH_OK; 3 MPing round trips")


def test_no_mon_says_what_to_do() -> None:
    r = msgr("ceph", "status", "--mon", f"v2:127.0.0.1:{free_port()}", "--timeout", "5")
    assert r.returncode == 2
    assert "nothing listens there: is ceph-mon running" in r.stderr


def test_bad_address_says_why() -> None:
    r = msgr("ceph", "ping", "--mon", "v1:127.0.0.1:6789")
    assert r.returncode == 2 and "msgr1" in r.stderr and "v2 address" in r.stderr


@pytest.fixture
def cephx_mon(tmp_path: Path) -> Iterator[CephMon]:
    with running_mon(tmp_path, auth="cephx") as mon:
        yield mon


def test_auth_required_says_what_to_do(cephx_mon: CephMon) -> None:
    r = msgr("ceph", "status", "--mon", cephx_mon.addr)
    assert r.returncode == 2
    assert "requires cephx, which asyncmsgr does not implement yet" in r.stderr
