"""rich progress and tables: a bar and a table on a terminal (a real pty), plain lines on
a pipe, and nothing but JSON with ``--json -`` / ``msgr status --json``."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .support import ROOT, running_pool

pytestmark = pytest.mark.timeout(120)

ESC = "\x1b"
TERM_ENV = {"TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}


def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def on_pty(*args: str, timeout: float = 90) -> tuple[int, str]:
    """Run the CLI with stdout on a pseudo-terminal; return its status and what it drew."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tools.cli", *args], cwd=ROOT, stdout=slave,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                env={**os.environ, **TERM_ENV})
    finally:
        os.close(slave)  # EOF (EIO) on the master once the child's copy closes
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the slave side is closed
                break
            if not chunk:
                break
            out += chunk
        rc = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return rc, out.decode(errors="replace")


def stress_args(port: int, *extra: str) -> tuple[str, ...]:
    return ("stress", "--target", f"127.0.0.1:{port}", "--conns", "2", "--messages", "3000",
            "--size-max", "256", "--timeout", "60", *extra)


def test_stress_progress_on_a_pipe_a_pty_and_with_json(tmp_path: Path) -> None:
    with running_pool(tmp_path, 1, app="echo") as pool:
        # A pipe: plain progress lines, no escape sequences, then the summary.
        r = cli(*stress_args(pool.port))
        assert r.returncode == 0, r.stdout + r.stderr
        assert ESC not in r.stdout
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("stress: ")]
        assert lines, r.stdout
        last = lines[-1]
        assert last.startswith("stress: 3000/3000 msgs (100%)") and "msgs/s" in last and "elapsed" in last
        assert "sent 3000" in last
        # --json -: stdout is one JSON object and nothing else.
        r = cli(*stress_args(pool.port, "--json", "-"))
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["sent"] == data["received"] == 3000 and data["lost"] == 0 and data["ok"] is True
        assert "stress:" not in r.stdout
        # A terminal: rich draws a bar with the rate, elapsed and remaining time.
        rc, drawn = on_pty(*stress_args(pool.port))
        assert rc == 0, drawn
        assert ESC in drawn  # cursor movement and colour: a live display
        assert "━" in drawn  # rich's bar
        assert "msgs/s" in drawn and "elapsed" in drawn and "remaining" in drawn
        assert "3000/3000" in drawn


def test_status_is_a_rich_table_on_a_terminal_and_json_stays_json(tmp_path: Path) -> None:
    with running_pool(tmp_path, 2) as pool:
        rc, drawn = on_pty("status", "--admin", pool.admin)
        assert rc == 0, drawn
        assert "┏" in drawn and "┃" in drawn  # a rich table's frame
        for col in ("slot", "pid", "state", "conns", "msgs_in", "restarts", "hb_age"):
            assert col in drawn
        assert drawn.count("ACCEPTING") == 2
        assert "accepting 2/2" in drawn
        # --json on a terminal is still exactly one JSON object.
        rc, drawn = on_pty("status", "--admin", pool.admin, "--json")
        assert rc == 0
        st = json.loads(drawn)
        assert len(st["workers"]) == 2
        # a pipe keeps the plain columns
        r = cli("status", "--admin", pool.admin)
        assert ESC not in r.stdout and "┃" not in r.stdout


def test_bench_progress_on_a_pipe_and_json_alone(tmp_path: Path) -> None:
    args = ("bench", "tcp", "--servers", "asyncmsgr", "--payloads", "64", "--duration", "0.3",
            "--repeat", "2")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert ESC not in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("bench tcp: ")]
    assert lines and lines[-1].startswith("bench tcp: 2/2 runs (100%)"), r.stdout
    assert "elapsed" in lines[-1]
    r = cli(*args, "--json", "-")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data["rounds"]) == 2 and data["results"][0]["server"] == "asyncmsgr"
    assert "requests/s" in r.stderr  # the tables went to stderr
