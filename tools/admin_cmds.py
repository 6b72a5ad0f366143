"""``msgr status``, ``msgr scale N``, ``msgr stop``: steer a running pool over its admin socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from pool.supervisor.admin import AdminClient, AdminError, default_admin_path
from tools.common import NotReady, wait_status

__all__ = ["TRANSIENT", "print_table", "register", "wait_scaled"]

#: states that mean "the pool has not settled yet"
TRANSIENT = {"SPAWNING", "READY", "DRAINING", "QUIESCED", "STOPPING", "STALLED", "BACKOFF"}
POLL = 0.05  # seconds between status polls while waiting on a condition (with a deadline)


def register(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--admin", default=None, help=f"admin socket (default {default_admin_path()})")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    p = sub.add_parser("status", parents=[common], help="show the workers of a running pool")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=status)
    p = sub.add_parser("scale", parents=[common], help="set the number of workers and wait for it")
    p.add_argument("n", type=int)
    p.add_argument("--no-wait", action="store_true", help="return once the request is accepted")
    p.set_defaults(func=scale)
    p = sub.add_parser("perf", parents=[common], help="print the pool's counters as JSON")
    p.set_defaults(func=perf)
    p = sub.add_parser("stop", parents=[common], help="stop the pool gracefully and wait until it is gone")
    p.set_defaults(func=stop)


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.admin, timeout=min(args.timeout, 10.0))


def _fail(cmd: str, exc: Exception) -> int:
    print(f"msgr {cmd}: {exc}", file=sys.stderr)
    return 1


def _age(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}s"


def status(args: argparse.Namespace) -> int:
    try:
        st = _client(args).call("status")
    except AdminError as exc:
        return _fail("status", exc)
    if args.json:
        print(json.dumps(st))
        return 0
    if sys.stdout.isatty():
        print_table(st)
        return 0
    print(f"pool pid {st['pid']}  accept={st['accept']}  bind={st['bind'][0]}:{st['bind'][1]}  "
          f"accepting {st['accepting']}/{st['desired']}{'  STOPPING' if st['stopping'] else ''}")
    cols = ("slot", "pid", "state", "conns", "msgs_in", "msgs_out", "restarts", "hb_age")
    rows = [(str(w["slot"]), str(w["pid"] or "-"), w["state"], str(w["connections"]), str(w["msgs_in"]),
             str(w["msgs_out"]), str(w["restarts"]), _age(w["heartbeat_age"])) for w in st["workers"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    for r in [cols, *rows]:
        print("  ".join(v.rjust(wd) if i not in (2,) else v.ljust(wd) for i, (v, wd) in enumerate(zip(r, widths))))
    return 0


STATE_STYLE = {"ACCEPTING": "green", "FAILED": "bold red", "STALLED": "red", "BACKOFF": "yellow",
               "DRAINING": "cyan", "QUIESCED": "cyan", "STOPPING": "magenta", "EXITED": "dim"}


def print_table(st: dict[str, Any]) -> None:
    """``msgr status`` on a terminal: a rich table (pipes get the plain columns)."""
    # rich is imported here, not at the top: every msgr command imports this module,
    # msgr serve included, and its workers are forked from it (fewer objects to copy).
    from rich.console import Console
    from rich.table import Table

    title = (f"pool {st['pid']}  {st['bind'][0]}:{st['bind'][1]}  accept={st['accept']}  "
             f"accepting {st['accepting']}/{st['desired']}" + ("  STOPPING" if st["stopping"] else ""))
    table = Table(title=title, title_justify="left")
    for col in ("slot", "pid", "state", "conns", "msgs_in", "msgs_out", "bytes_in", "bytes_out",
                "retained", "restarts", "hb_age"):
        table.add_column(col, justify="left" if col == "state" else "right")
    for w in st["workers"]:
        state = w["state"]
        table.add_row(str(w["slot"]), str(w["pid"] or "-"), f"[{STATE_STYLE.get(state, '')}]{state}",
                      str(w["connections"]), f"{w['msgs_in']:,}", f"{w['msgs_out']:,}",
                      f"{w['bytes_in']:,}", f"{w['bytes_out']:,}", str(w.get("sessions_retained", 0)),
                      str(w["restarts"]), _age(w["heartbeat_age"]))
    Console().print(table)


def perf(args: argparse.Namespace) -> int:
    try:
        print(json.dumps(_client(args).call("perf")))
    except AdminError as exc:
        return _fail("perf", exc)
    return 0


def settled(st: dict[str, Any], n: int) -> bool:
    """Exactly ``n`` workers ACCEPTING and every other slot EXITED or FAILED."""
    states = [w["state"] for w in st["workers"]]
    return states.count("ACCEPTING") == n and not TRANSIENT.intersection(states)


def wait_scaled(client: AdminClient, n: int, timeout: float) -> dict[str, Any]:
    try:
        st = wait_status(client, lambda st: settled(st, n) or bool(st["stopping"]), timeout, POLL,
                         tolerate=())
    except NotReady as exc:
        assert exc.last is not None  # errors propagate, so at least one status was read
        states = ", ".join(f"{w['slot']}:{w['state']}" for w in exc.last["workers"])
        raise AdminError(f"not settled at {n} accepting workers after {timeout}s ({states})") from None
    if not settled(st, n):
        raise AdminError("the pool is stopping")
    return st


def scale(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        client.call("scale", n=args.n)
        if not args.no_wait:
            wait_scaled(client, args.n, args.timeout)
    except AdminError as exc:
        return _fail("scale", exc)
    return 0


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):
        return True


def stop(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        reply = client.call("stop")
    except AdminError as exc:
        return _fail("stop", exc)
    deadline = time.monotonic() + args.timeout
    # The supervisor removes its socket file last, after its workers and its segment.
    while os.path.exists(client.path) or not _gone(int(reply["pid"])):
        if time.monotonic() > deadline:
            return _fail("stop", AdminError(f"pool {reply['pid']} still running after {args.timeout}s"))
        time.sleep(POLL)
    return 0
