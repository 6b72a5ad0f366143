"""Servers reached through port forwarding, and failures that say why (issue 13, 3-4).

A real forwarder process sits between ``msgr stress`` and a pool, on another port: the
shape of ``docker -p``. The client dials the forwarder's port; the pool's SERVER_IDENT
names its own, unless ``--advertise`` names the forwarder's.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .support import ROOT, Pool, msgr


@contextmanager
def forwarder() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """A forwarder process; yields (its port, the process). Write the target port to its
    stdin to start forwarding."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.pool.forwarder"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("LISTEN "), line
        yield int(line.split()[1]), proc
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # its stop signal
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def _forward(proc: subprocess.Popen[str], port: int) -> None:
    assert proc.stdin is not None
    proc.stdin.write(f"{port}\n")
    proc.stdin.flush()


@contextmanager
def pool_behind_forwarder(tmp: Path, advertise: bool) -> Iterator[int]:
    """A 2-worker echo pool and a forwarder to it; yields the forwarder's port."""
    with forwarder() as (fport, proc):
        extra = ("--advertise", f"127.0.0.1:{fport}") if advertise else ()
        pool = Pool(tmp, 2, app="echo", extra=extra)
        try:
            pool.wait_accepting(2)
            _forward(proc, pool.port)
            yield fport
        finally:
            rc = pool.stop()
            assert rc == 0, pool.log()


def _stress(tmp: Path, port: int, *args: str) -> tuple[int, dict[str, object], str]:
    out = tmp / f"stress-{time.monotonic_ns()}.json"
    r = msgr("stress", "--target", f"127.0.0.1:{port}", "--conns", "2", "--messages", "50",
             "--size-max", "512", "--json", str(out), *args, timeout=90)
    return r.returncode, json.loads(out.read_text()), r.stdout + r.stderr


def test_strict_identity_through_forwarder_fails_fast_and_says_why(tmp_path: Path) -> None:
    with pool_behind_forwarder(tmp_path, advertise=False) as fport:
        t0 = time.monotonic()
        rc, res, text = _stress(tmp_path, fport, "--identity", "strict")
        elapsed = time.monotonic() - t0
    assert rc == 1
    # Every connection was told the reason once; the run ended instead of retrying forever.
    assert res["received"] == 0 and res["connected"] == 0
    assert "every connection failed its handshake" in str(res["gave_up"])
    reasons = list(res["handshake_failures"])  # type: ignore[call-overload]
    assert reasons and all(f"not 127.0.0.1:{fport} that we dialled" in r for r in reasons)
    assert "--advertise" in reasons[0]
    assert "identifies as 127.0.0.1:" in text and "--advertise" in text
    assert elapsed < 30, f"took {elapsed:.1f}s: the failure was retried instead of reported"


def test_record_identity_is_the_client_default_through_a_forwarder(tmp_path: Path) -> None:
    with pool_behind_forwarder(tmp_path, advertise=False) as fport:
        rc, res, text = _stress(tmp_path, fport)
    assert rc == 0, text
    assert res["received"] == 50 and res["lost"] == 0 and res["connected"] == 2


def test_advertise_makes_strict_identity_work_through_a_forwarder(tmp_path: Path) -> None:
    with pool_behind_forwarder(tmp_path, advertise=True) as fport:
        rc, res, text = _stress(tmp_path, fport, "--identity", "strict")
    assert rc == 0, text
    assert res["received"] == 50 and res["lost"] == 0 and not res["handshake_failures"]


def test_unreachable_target_is_explained(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # a port we hold but never listen on: connects are refused
    port = s.getsockname()[1]
    try:
        rc, res, text = _stress(tmp_path, port, "--connect-timeout", "1.5")
    finally:
        s.close()
    assert rc == 1
    gave_up = str(res["gave_up"])
    assert f"nothing could connect to ('127.0.0.1', {port}) within 1.5s" in gave_up
    assert "attempts refused (ECONNREFUSED)" in gave_up and "last error: connect to" in gave_up
    assert int(gave_up.split(": ", 1)[1].split()[0]) >= 2  # refused more than once
    assert "nothing could connect" in text


def test_advertise_rejects_bad_values(tmp_path: Path) -> None:
    r = msgr("serve", "--advertise", "nohostport", "--admin", str(tmp_path / "a.sock"))
    assert r.returncode == 2 and "--advertise 'nohostport' must be HOST:PORT" in r.stderr
    r = msgr("serve", "--advertise", "0.0.0.0:80", "--admin", str(tmp_path / "a.sock"))
    assert r.returncode == 2 and "not a wildcard" in r.stderr


def test_duration_is_not_cut_short_by_a_default_message_count(tmp_path: Path) -> None:
    pool = Pool(tmp_path, 1, app="echo")
    try:
        pool.wait_accepting(1)
        out = tmp_path / "d.json"
        r = msgr("stress", "--target", f"127.0.0.1:{pool.port}", "--conns", "2",
                 "--duration", "1.5", "--size-max", "64", "--window", "512",
                 "--json", str(out), timeout=60)
    finally:
        assert pool.stop() == 0, pool.log()
    res = json.loads(out.read_text())
    assert r.returncode == 0, r.stdout + r.stderr
    assert res["elapsed_s"] >= 1.5 and res["lost"] == 0 and res["sent"] == res["received"]
