"""``msgr bench tcp --instructions``: server instructions per request, under callgrind.

The VMs this project runs on expose no hardware counters and their clocks move by 30 %
between runs; instructions executed do not. Each server of ``msgr bench tcp`` runs under
``valgrind --tool=callgrind`` while the same native client as in the timed run sends a
fixed number of requests (window 128); the server then exits on SIGTERM and callgrind
writes its total. Two runs per server, with ``N1`` and ``N2`` requests, cancel start-up
and shutdown: instructions per request = (I(N2) - I(N1)) / (N2 - N1).

asyncmsgr is measured twice: on the compiled per-message path and on the pure-Python
path (``ASYNCMSGR_NO_EXTENSIONS=1``). Everything the server process executes counts:
the interpreter, the kernel-call wrappers, libzmq's I/O thread.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from tools.bench.common import ForkedCall
from tools.common import free_port

__all__ = ["instructions", "run", "serve_main"]

WINDOW = 128
#: the asyncmsgr server on the pure-Python path: same server, extensions disabled
PURE = "asyncmsgr-python"
_TOTAL = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def _kind_env(kind: str) -> tuple[str, dict[str, str]]:
    env = dict(os.environ)
    env.pop("ASYNCMSGR_NO_EXTENSIONS", None)
    if kind == PURE:
        env["ASYNCMSGR_NO_EXTENSIONS"] = "1"
        return "asyncmsgr", env
    return kind, env


def instructions(kind: str, payload: bytes, requests: int, timeout: float = 600.0) -> int:
    """Instructions the ``kind`` server executed, start to exit, serving ``requests``."""
    from tools.bench.tcp_peers import SERVERS

    server, env = _kind_env(kind)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="msgr-callgrind-") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
             "-m", "tools.bench.instructions", server, str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            if not ready or proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"{kind} did not start under callgrind: "
                                   f"{_tail(proc)}")
            client = SERVERS[server][1]
            done = ForkedCall(lambda: client(port, WINDOW, payload, timeout, None, requests),
                              f"{kind} client").result()
            if done != requests:
                raise RuntimeError(f"{kind}: {done} of {requests} requests answered")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} under callgrind exited {proc.returncode}: {_tail(proc)}")
        with open(out, "rb") as f:
            m = _TOTAL.search(f.read())
        if m is None:
            raise RuntimeError(f"no instruction total in {kind}'s callgrind output")
        return int(m.group(1))


def _tail(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None or proc.stderr is None:
        return "(still running)"
    return proc.stderr.read().decode(errors="replace")[-600:]


def per_request(kind: str, size: int, n1: int, n2: int) -> dict[str, Any]:
    payload = os.urandom(size)
    i1 = instructions(kind, payload, n1)
    i2 = instructions(kind, payload, n2)
    return {"server": kind, "payload": size, "requests": [n1, n2], "instructions": [i1, i2],
            "instr_per_req": (i2 - i1) / (n2 - n1)}


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'server':<18} {'payload':>7} {'instr/request':>14} {'vs asyncmsgr':>13}"]
    base = {r["payload"]: r["instr_per_req"] for r in rows
            if r["server"] == "asyncmsgr" and "instr_per_req" in r}
    for r in rows:
        if "instr_per_req" not in r:
            lines.append(f"{r['server']:<18} {r['payload']:>7}  {r['error']}")
            continue
        b = base.get(r["payload"])
        ratio = f"{r['instr_per_req'] / b:12.2f}x" if b else ""
        lines.append(f"{r['server']:<18} {r['payload']:>7} {r['instr_per_req']:>14,.0f} {ratio:>13}")
    lines.append("\nratio = server / asyncmsgr (compiled path): < 1 means fewer instructions")
    return "\n".join(lines)


def run(args: argparse.Namespace, servers: list[str], missing: dict[str, str | None]
        ) -> tuple[list[dict[str, Any]], str]:
    """The ``--instructions`` mode of ``msgr bench tcp``: rows and their table."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("--instructions needs valgrind (Debian: apt-get install valgrind)")
    n1, n2 = (int(x) for x in args.requests.split(","))
    if not 0 < n1 < n2:
        raise ValueError(f"--requests N1,N2 needs 0 < N1 < N2, got {args.requests}")
    kinds = list(servers)
    if "asyncmsgr" in kinds:
        kinds.insert(kinds.index("asyncmsgr") + 1, PURE)
    rows: list[dict[str, Any]] = []
    for size in (int(x) for x in args.payloads.split(",")):
        for kind in kinds:
            why = missing.get(kind if kind != PURE else "asyncmsgr")
            if why:
                rows.append({"server": kind, "payload": size, "error": why})
                continue
            print(f"callgrind: {kind} ({size} B, {n1} and {n2} requests)...", file=sys.stderr)
            try:
                rows.append(per_request(kind, size, n1, n2))
            except Exception as err:  # noqa: BLE001 - one server's failure is one row
                rows.append({"server": kind, "payload": size, "error": f"failed: {err}"})
    return rows, format_rows(rows)


def serve_main(argv: list[str]) -> int:
    """``python -m tools.bench.instructions KIND PORT``: one bench server, "ready" on
    stdout once it listens, until SIGTERM (what callgrind runs)."""
    from tools.bench.tcp_peers import SERVERS

    kind, port = argv[0], int(argv[1])

    def ready() -> None:
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    SERVERS[kind][0](port, ready)
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
