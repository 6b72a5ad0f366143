"""``msgr ceph status|command|ping --mon v2:HOST:PORT``: talk to a real ceph-mon.

Pure Python over asyncmsgr's own msgr2.1 (crc mode, auth none): no librados, no ceph
CLI. Exit status 0 on success, 1 when the mon answered with an error (``command``'s
result code), 2 when the mon could not be reached or refused us; the message says what
happened and what to do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from pool.api import MonClient, MonError

__all__ = ["register"]


def _client(args: argparse.Namespace) -> MonClient:
    return MonClient(args.mon, name=args.name, timeout=args.timeout)


def _status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        status = c.status()
    print(json.dumps(status, indent=None if args.compact else 2, sort_keys=True))
    return 0


def _command(args: argparse.Namespace) -> int:
    try:
        cmd = json.loads(args.cmd)
    except json.JSONDecodeError as exc:
        raise MonError(f"the command must be JSON such as "
                       f"'{{\"prefix\": \"mon dump\", \"format\": \"json\"}}': {exc}") from None
    if not isinstance(cmd, dict) or "prefix" not in cmd:
        raise MonError("the command must be a JSON object with a \"prefix\"")
    with _client(args) as c:
        ack = c.command(cmd)
    print(f"r = {ack.r}")
    print(f"rs = {ack.rs}")
    out = ack.outbl.decode(errors="replace")
    if out:
        print(out.rstrip("\n"))
    return 0 if ack.r == 0 else 1


def _ping(args: argparse.Namespace) -> int:
    rtts: list[float] = []
    with _client(args) as c:
        c.connect()
        for _ in range(args.count):
            rtt, status = c.ping()
            rtts.append(rtt)
    health = status.get("health", {}).get("status", "?")
    name = status.get("mon_status", {}).get("name", "?")
    print(f"mon.{name} at {args.mon}: {health}; {len(rtts)} MPing round trips, "
          f"min {min(rtts) * 1e6:.0f} us, median {statistics.median(rtts) * 1e6:.0f} us, "
          f"max {max(rtts) * 1e6:.0f} us")
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        code: int = args.ceph_func(args)
        return code
    except MonError as exc:
        print(f"msgr ceph {args.ceph_command}: {exc}", file=sys.stderr)
        return 2


def register(sub: Any) -> None:
    p = sub.add_parser("ceph", help="talk msgr2 to a real ceph-mon (status, command, ping)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="ceph_command", required=True, metavar="CEPH_COMMAND")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--mon", required=True, metavar="v2:HOST:PORT",
                       help="the mon's msgr2 address (e.g. v2:127.0.0.1:3300)")
        q.add_argument("--name", default="client.admin", help="entity name (auth none)")
        q.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
        q.set_defaults(func=_run)

    q = cmds.add_parser("status", help="print the mon's status JSON")
    common(q)
    q.add_argument("--compact", action="store_true", help="one line of JSON")
    q.set_defaults(ceph_func=_status)
    q = cmds.add_parser("command", help="run one mon command given as JSON")
    common(q)
    q.add_argument("cmd", help="e.g. '{\"prefix\": \"mon dump\", \"format\": \"json\"}'")
    q.set_defaults(ceph_func=_command)
    q = cmds.add_parser("ping", help="time MPing round trips")
    common(q)
    q.add_argument("--count", type=int, default=5, help="round trips (default 5)")
    q.set_defaults(ceph_func=_ping)
