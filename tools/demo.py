"""``msgr demo`` (what ``make run`` runs): a pool serving, visibly.

Starts ``msgr serve`` with two workers, drives verified lossless traffic through it with
``msgr stress`` (socket failures injected on both sides), scales the pool 2 → 4 → 2 while
the traffic runs, prints the status table between steps, then stops the pool. Every
step is a real process talking over loopback; nothing is simulated. ``--forever`` keeps
the pool serving afterwards until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from tools.common import NotReady, free_port, wait_status

__all__ = ["register", "run"]


def _msgr(*args: str) -> list[str]:
    return [sys.executable, "-m", "tools.cli", *args]


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _wait_accepting(admin: str, n: int, timeout: float = 20.0) -> None:
    try:
        wait_status(admin, lambda st: st.get("accepting") == n, timeout, 0.1)
    except NotReady:
        raise TimeoutError(f"pool at {admin} did not reach {n} accepting workers in {timeout}s") from None


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="start a pool, drive verified traffic, scale it, show it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=12.0, help="how long the traffic runs")
    p.add_argument("--forever", action="store_true", help="keep serving until Ctrl-C")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="msgr-demo-")
    admin = os.path.join(tmp, "admin.sock")
    result_json = os.path.join(tmp, "stress.json")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    _say(f"starting the pool: msgr serve --bind 127.0.0.1:{port} --workers {args.workers} "
         f"--inject-socket-failures 200")
    serve = subprocess.Popen(
        _msgr("serve", "--bind", f"127.0.0.1:{port}", "--workers", str(args.workers),
              "--admin", admin, "--inject-socket-failures", "200"), env=env)
    rc = 1
    try:
        _wait_accepting(admin, args.workers)
        subprocess.run(_msgr("status", "--admin", admin), env=env, check=False)
        _say(f"driving {args.seconds:.0f}s of verified lossless traffic: 16 sessions, "
             "payloads 32 B..16 KiB, socket failures 1/200 on both sides")
        stress = subprocess.Popen(
            _msgr("stress", "--target", f"127.0.0.1:{port}", "--conns", "16",
                  "--messages", "0", "--duration", str(args.seconds), "--size-max", "16384",
                  "--inject-socket-failures", "200", "--json", result_json), env=env)
        bigger = args.workers * 2
        time.sleep(args.seconds / 3)  # let traffic build before changing the pool
        _say(f"scaling up under load: msgr scale {bigger}")
        subprocess.run(_msgr("scale", str(bigger), "--admin", admin), env=env, check=True)
        subprocess.run(_msgr("status", "--admin", admin), env=env, check=False)
        time.sleep(args.seconds / 3)
        _say(f"scaling down under load: msgr scale {args.workers} "
             "(live sessions migrate to the surviving workers)")
        subprocess.run(_msgr("scale", str(args.workers), "--admin", admin), env=env, check=True)
        subprocess.run(_msgr("status", "--admin", admin), env=env, check=False)
        rc = stress.wait(timeout=args.seconds + 180)
        _say(f"stress verdict: exit {rc} (JSON in {result_json})")
        subprocess.run(_msgr("status", "--admin", admin), env=env, check=False)
        if args.forever:
            _say(f"serving on 127.0.0.1:{port} until Ctrl-C (admin socket {admin})")
            stop = threading.Event()
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            while not stop.is_set() and serve.poll() is None:
                stop.wait(1.0)
    finally:
        _say("stopping the pool: msgr stop")
        if serve.poll() is None:
            subprocess.run(_msgr("stop", "--admin", admin), env=env, check=False)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
    return rc
