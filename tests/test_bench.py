"""`msgr bench tcp` runs end to end (a short run, not a timed test) and reads its figures
right: medians over rounds, and issue 5's target ratios."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tools.bench import tcp as bench_tcp


def _row(server: str, **figs: float) -> dict[str, Any]:
    base = dict.fromkeys(bench_tcp._FIGURES, 1.0)
    base.update(figs)
    return {"server": server, "payload": 64, **base}


def test_median_over_rounds_and_errors() -> None:
    rounds = [
        [_row("asyncmsgr", rps_w128=100.0), {"server": "pyzmq", "payload": 64, "error": "x"}],
        [_row("asyncmsgr", rps_w128=300.0), _row("pyzmq", rps_w128=7.0)],
        [_row("asyncmsgr", rps_w128=200.0), {"server": "pyzmq", "payload": 64, "error": "y"}],
    ]
    rows = bench_tcp.median_rows(rounds)
    assert rows[0]["rps_w128"] == 200.0 and rows[0]["rounds"] == 3
    assert rows[1]["rps_w128"] == 7.0 and rows[1]["rounds"] == 1  # the one good round


def test_target_lines_say_met_or_not() -> None:
    rows = [_row("asyncmsgr", rps_w128=100.0, cpu_us_per_req=3.0, rtt_p50_us=50.0),
            _row("uvloop", rps_w128=100.0), _row("pyzmq", rps_w128=60.0),
            _row("epoll", cpu_us_per_req=2.0), _row("asyncio", rtt_p50_us=50.0),
            _row("asyncmsgr-secure", cpu_us_per_req=4.5)]
    text = bench_tcp.target_lines(rows)
    assert text[0] == "\ntargets at 64 B (asyncmsgr / peer):"
    lines = {line.split("  ")[1]: line for line in text[1:]}
    assert lines["req/s w128 vs uvloop"].endswith("1.00x  (target >= 1.0x: met)")
    assert lines["req/s w128 vs pyzmq"].endswith("1.67x  (target >= 2.0x: NOT met)")
    assert lines["server CPU/req vs epoll"].endswith("1.50x  (target <= 1.5x: met)")
    assert lines["w1 RTT p50 vs asyncio"].endswith("1.00x  (target <= 1.2x: met)")
    assert lines["secure CPU/req vs crc"].endswith("1.50x  (target <= 1.3x: NOT met)")
    big = [dict(r, payload=4096) for r in rows[:2]]
    assert bench_tcp.target_lines(rows + big)[-2:] == [
        "\ntargets at 4096 B (asyncmsgr / peer):",
        "  req/s w128 vs uvloop        1.00x  (target >= 1.0x: met)"]


@pytest.mark.timeout(90)
def test_bench_tcp_short_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    args = argparse.Namespace(servers="asyncmsgr,epoll", payloads="64", duration=0.3,
                              repeat=2, json=str(out), plot=None, instructions=False,
                              requests="2000,10000")
    assert bench_tcp.run(args) == 0
    data = json.loads(out.read_text())
    assert len(data["rounds"]) == 2 and data["meta"]["repeat"] == 2
    for row in data["results"]:
        assert "error" not in row, row
        assert row["rounds"] == 2
        assert row["rps_w1"] > 0 and row["rps_w128"] > 0 and row["cpu_us_per_req"] > 0
        assert 0 < row["rtt_p50_us"] <= row["rtt_p99_us"]
    printed = capsys.readouterr().out
    assert "asyncmsgr" in printed and "epoll" in printed
    assert "server CPU/req vs epoll" in printed  # the target check printed
    assert "requests/s, window 128, 64 B" in printed  # and the text chart


def test_text_chart_scales_bars_to_the_fastest() -> None:
    rows = [_row("asyncmsgr", rps_w128=50.0), _row("uvloop", rps_w128=200.0)]
    lines = bench_tcp.text_chart(rows, width=20).splitlines()
    assert lines[0] == "requests/s, window 128, 64 B"
    assert lines[1].count("#") == 5 and lines[2].count("#") == 20


def test_echo_instructions_workload_runs_and_checks_its_arguments(
        capsys: pytest.CaptureFixture[str]) -> None:
    from tools.bench import echo_instructions
    assert echo_instructions.main(["64", "300"]) == 0  # every echo came back (else it hangs)
    for driver in echo_instructions.DRIVERS:  # the same echo as a worker runs it, per driver
        assert echo_instructions.main(["64", "300", driver]) == 0
    assert echo_instructions.main(["64"]) == 2
    assert echo_instructions.main(["64", "300", "kqueue"]) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["epoll", "asyncmsgr", "pyzmq", "grpc-stream", "grpc-unary",
                                  "asyncmsgr-asyncio", "asyncmsgr-uvloop", "aio-client"])
def test_clients_stop_at_their_request_limit(kind: str) -> None:
    """The instruction counts need an exact request count from every client."""
    from tools.bench.common import fork_server
    from tools.bench.tcp_peers import SERVERS
    from tools.common import free_port

    if bench_tcp.available(kind):  # the bench extra is part of the test install
        pytest.fail(f"{kind}: {bench_tcp.available(kind)}")
    serve, client, _ = SERVERS[kind]
    port = free_port()
    pid = fork_server(lambda ready: serve(port, ready), kind)
    try:
        assert client(port, 16, b"x" * 64, 30.0, None, 37) == 37
        lat: list[int] = []
        assert client(port, 4, b"y", 30.0, lat, 9) == 9 and len(lat) == 9
    finally:
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    assert status == 0  # each server exits cleanly on SIGTERM (callgrind needs that)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_bench_tcp_instructions_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "instr.json"
    args = argparse.Namespace(servers="epoll", payloads="64", duration=1.0, repeat=1,
                              json=str(out), plot=None, instructions=True, requests="40,200")
    assert bench_tcp.run(args) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["server"] == "epoll" and row["requests"] == [40, 200]
    i1, i2 = row["instructions"]
    assert 0 < i1 < i2  # more requests, more instructions
    assert 1_000 < row["instr_per_req"] < 2_000_000
    assert "instr/request" in capsys.readouterr().out


def test_instructions_mode_refuses_bad_request_counts(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(servers="epoll", payloads="64", duration=1.0, repeat=1,
                              json=None, plot=None, instructions=True, requests="500,100")
    assert bench_tcp.run(args) == 2
    assert "0 < N1 < N2" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_kv_instructions_workload_runs_and_checks_its_arguments(
        capsys: pytest.CaptureFixture[str]) -> None:
    from tools.bench import kv_instructions
    # every GET came back with its value, from the worker the kind says (asserted inside)
    assert kv_instructions.main(["cross", "100"]) == 0
    assert kv_instructions.main(["local", "100"]) == 0
    assert kv_instructions.main(["sideways", "1"]) == 2
    assert "usage:" in capsys.readouterr().err
