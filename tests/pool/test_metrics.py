"""``msgr serve --metrics``: a real pool, a real stress client, real HTTP scrapes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tools.common import free_port

from .support import ROOT, running_pool, wait_for

pytestmark = pytest.mark.timeout(120)

Families = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(port: int) -> Families:
    """GET /metrics and parse it with prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: Families = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def total(f: Families, name: str) -> float:
    return f[name][()]


def per_worker(f: Families, name: str) -> dict[str, float]:
    return {dict(k)["worker"]: v for k, v in f[name].items()}


COUNTERS = ("messages_received_total", "messages_sent_total", "received_bytes_total", "sent_bytes_total",
            "restarts_total", "sessions_evicted_total", "ring_records_sent_total",
            "ring_requests_served_total", "throttle_refusals_total", "handoffs_received_total")
GAUGES = ("connections", "sessions_retained", "retained_bytes", "throttle_held_messages")


def check_sums(f: Families) -> None:
    for name in (*COUNTERS, *GAUGES):
        each = per_worker(f, f"asyncmsgr_worker_{name}")
        assert set(each) == {"0", "1"}, (name, each)
        assert total(f, f"asyncmsgr_{name}") == sum(each.values()), name


def test_metrics_follow_a_stress_run(tmp_path: Path) -> None:
    mport = free_port()
    with running_pool(tmp_path, 2, app="echo", extra=("--metrics", f"127.0.0.1:{mport}")) as pool:
        before = scrape(mport)
        check_sums(before)
        assert total(before, "asyncmsgr_messages_received_total") == 0
        assert total(before, "asyncmsgr_workers_accepting") == 2
        states = per_worker(before, "asyncmsgr_worker_state")  # only the label set matters here
        assert set(states) == {"0", "1"}
        accepting = {dict(k)["worker"] for k, v in before["asyncmsgr_worker_state"].items()
                     if dict(k)["state"] == "ACCEPTING" and v == 1}
        assert accepting == {"0", "1"}
        assert before["asyncmsgr_workers"][(("state", "ACCEPTING"),)] == 2

        stress = subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "stress", "--target", f"127.0.0.1:{pool.port}",
             "--conns", "4", "--messages", "4000", "--size-max", "512", "--timeout", "60"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # During the run: counters move while the client is still sending.
            def moving() -> Families | None:
                f = scrape(mport)
                return f if total(f, "asyncmsgr_messages_received_total") > 0 else None

            during = wait_for(moving, 60, "traffic in the metrics")
            check_sums(during)
            out, _ = stress.communicate(timeout=90)
        finally:
            if stress.poll() is None:
                stress.kill()
                stress.wait()
        assert stress.returncode == 0, out

        def settled() -> Families | None:
            # Workers publish their counters from their loop; wait for the last ones.
            f = scrape(mport)
            return f if total(f, "asyncmsgr_messages_received_total") >= 4000 else None

        after = wait_for(settled, 20, "all 4000 messages counted")
        check_sums(after)
        for name in ("messages_received_total", "messages_sent_total", "received_bytes_total",
                     "sent_bytes_total"):
            # counters only grow: 0 before, > 0 during, at least as much after
            assert total(before, f"asyncmsgr_{name}") == 0, name
            assert 0 < total(during, f"asyncmsgr_{name}") <= total(after, f"asyncmsgr_{name}"), name
        assert total(after, "asyncmsgr_received_bytes_total") >= 4000 * 32
        assert total(after, "asyncmsgr_processor_accepted_total") >= 4
        assert total(after, "asyncmsgr_scrape_snapshot_age_seconds") == 0


def test_slow_scrapers_do_not_stall_the_supervisor(tmp_path: Path) -> None:
    mport = free_port()
    with running_pool(tmp_path, 1, app="echo", extra=("--metrics", f"127.0.0.1:{mport}")) as pool:
        # Twenty clients that connect and never finish a request: more than the server's
        # cap (8), each held until its request timeout.
        idle = [socket.create_connection(("127.0.0.1", mport), timeout=5) for _ in range(20)]
        try:
            for s in idle[:10]:
                s.sendall(b"GET /metr")  # half a request line, then silence
            t0 = time.monotonic()
            for _ in range(20):
                assert pool.status()["accepting"] == 1  # the arbiter loop keeps answering
            assert time.monotonic() - t0 < 5.0
        finally:
            for s in idle:
                s.close()
        # Once they are gone, scrapes are served again.
        f = wait_for(lambda: _try_scrape(mport), 30, "a scrape after the slow clients left")
        assert total(f, "asyncmsgr_workers_accepting") == 1
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{mport}/nothing", timeout=10)
        assert err.value.code == 404


def _try_scrape(port: int) -> Families | None:
    try:
        return scrape(port)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def test_metrics_port_in_use_is_explained(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        r = subprocess.run([sys.executable, "-m", "tools.cli", "serve", "--bind", "127.0.0.1:0",
                            "--workers", "1", "--admin", str(tmp_path / "a.sock"),
                            "--metrics", f"127.0.0.1:{busy.getsockname()[1]}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    finally:
        busy.close()
    assert r.returncode == 1
    assert "--metrics 127.0.0.1:" in r.stderr and "in use" in r.stderr, r.stderr


def test_ring_traffic_of_the_kv_app_is_counted(tmp_path: Path) -> None:
    mport = free_port()
    with running_pool(tmp_path, 2, app="kv", extra=("--metrics", f"127.0.0.1:{mport}")) as pool:
        # The kv app already talks over the rings at start-up (shard hand-over as the
        # peer map settles), so measure growth from here.
        base = total(scrape(mport), "asyncmsgr_ring_requests_served_total")
        r = subprocess.run([sys.executable, "-m", "tools.cli", "stress", "--app", "kv", "--target",
                            f"127.0.0.1:{pool.port}", "--conns", "2", "--messages", "400"],
                           cwd=ROOT, capture_output=True, text=True, timeout=90, check=False)
        assert r.returncode == 0, r.stdout + r.stderr

        def forwarded() -> Families | None:
            # Keys are sharded over both workers: about half the operations cross a ring.
            # Each worker publishes these every 0.25 s at most, so wait until the
            # sender's and the server's figures agree: every request served and its reply
            # received, and the records written are exactly those requests and replies.
            f = scrape(mport)
            records, served, replies = (total(f, f"asyncmsgr_{n}_total") for n in (
                "ring_records_sent", "ring_requests_served", "ring_replies_received"))
            return f if base < served == replies and records == served + replies else None

        f = wait_for(forwarded, 30, "ring traffic in the metrics, served = replied")
        check_sums(f)
        assert total(f, "asyncmsgr_ring_requests_failed_total") == 0


def test_a_killed_worker_shows_as_a_restart_and_its_states(tmp_path: Path) -> None:
    mport = free_port()
    with running_pool(tmp_path, 2, extra=("--metrics", f"127.0.0.1:{mport}")) as pool:
        victim = next(w for w in pool.status()["workers"] if w["slot"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)

        def restarted() -> Families | None:
            f = scrape(mport)
            back = f["asyncmsgr_workers"][(("state", "ACCEPTING"),)] == 2
            return f if back and total(f, "asyncmsgr_restarts_total") == 1 else None

        f = wait_for(restarted, 30, "slot 1 restarted and accepting again")
        assert per_worker(f, "asyncmsgr_worker_restarts_total") == {"0": 0, "1": 1}
        assert total(f, "asyncmsgr_supervisor_restarts_total") == 1
        assert total(f, "asyncmsgr_supervisor_spawned_total") == 3
