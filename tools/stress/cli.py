"""``msgr stress``: the command line of both workloads (:mod:`.echo`, :mod:`.kv`)."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import asdict
from typing import Any

from pool.api import AuthSettings, KeyringError, load_keyring
from tools.common import parse_target

from . import echo, kv
from .common import (
    DEFAULT_MESSAGES,
    JSON_STDOUT,
    ChaosConfig,
    parse_scale_range,
    report,
)

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p = sub.add_parser("stress", help="verify a live pool under load (Ceph SyntheticWorkload)",
                       description=echo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=parse_target, default=("127.0.0.1", 6800),
                   help="HOST:PORT of the pool (default 127.0.0.1:6800)")
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--messages", type=int, default=None,
                   help="messages to send (default 10000; with --duration: no cap unless "
                        "given)")
    p.add_argument("--size-min", type=int, default=32)
    p.add_argument("--size-max", type=int, default=4096)
    p.add_argument("--window", type=int, default=64, help="messages in flight at most")
    p.add_argument("--policy", choices=["lossless", "lossy"], default="lossless")
    p.add_argument("--inject-socket-failures", type=int, default=0, metavar="N",
                   help="shut the socket down with probability 1/N per I/O (client side)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to keep sending")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the last replies")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="give up, saying why, if no connection completes a handshake in S")
    p.add_argument("--identity", choices=["strict", "record"], default=None,
                   help="strict: refuse a server whose SERVER_IDENT does not name the "
                        "--target (Ceph); record (default for clients): accept and record "
                        "it, as a client behind port forwarding needs")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-resets", action="store_true",
                   help="also fail if any session was reset (scale tests)")
    p.add_argument("--auth", choices=["none", "secret"], default="none")
    p.add_argument("--keyring", metavar="FILE", help="TOML keyring (mode 0600) for --auth secret")
    p.add_argument("--name", default="client.admin", help="our entity name in the keyring")
    p.add_argument("--mode", choices=["crc", "secure"], default="crc",
                   help="secure = AES-128-GCM on every frame (needs --auth secret)")
    p.add_argument("--stack", choices=["posix", "dpdk", "rdma"], default="posix",
                   help="dpdk (memif) and rdma: --target is the pool's --stack-path; "
                        "sessions spread over its per-worker endpoints")
    p.add_argument("--memif-mode", choices=["interrupt", "poll"], default="interrupt",
                   help="dpdk: busy-poll our memif connections (poll) or sleep until kicked")
    p.add_argument("--chaos-admin", metavar="PATH",
                   help="admin socket of the pool under test: enables --kill-every/--scale-every")
    p.add_argument("--kill-every", type=float, default=0.0, metavar="S",
                   help="SIGKILL a random worker of that pool every S seconds")
    p.add_argument("--scale-every", type=float, default=0.0, metavar="S",
                   help="rescale that pool to a random size in --scale-range every S seconds")
    p.add_argument("--scale-range", default="1-4", metavar="MIN-MAX")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON ('-': to stdout, alone; "
                   "no progress then)")
    p.add_argument("--app", choices=["echo", "kv"], default="echo",
                   help="kv: write then read back keys of a `serve --app kv` pool "
                        "(tools.stress.kv; --messages = operations, half writes, half reads)")
    p.set_defaults(func=run)


def _message_cap(args: argparse.Namespace) -> int:
    """--messages as given; unset: no cap with --duration, else DEFAULT_MESSAGES."""
    if args.messages is not None:
        return int(args.messages)
    return 0 if args.duration > 0 else DEFAULT_MESSAGES


def run(args: argparse.Namespace) -> int:
    if args.conns < 1 or args.window < 1:
        print("msgr stress: --conns and --window must be at least 1", file=sys.stderr)
        return 2
    if getattr(args, "app", "echo") == "kv":
        return kv.run_cli(args)
    try:
        keyring = load_keyring(args.keyring) if args.keyring else {}
        auth = AuthSettings(args.auth, args.mode, args.name, keyring)
    except (KeyringError, ValueError) as err:
        print(f"msgr stress: {err}", file=sys.stderr)
        return 2
    target = args.target
    if args.stack != "posix":
        target = args.target if isinstance(args.target, str) else f"{args.target[0]}"
    chaos = None
    if args.chaos_admin:
        scale_range = parse_scale_range(args.scale_range)
        if scale_range is None:
            print("msgr stress: --scale-range must look like 2-4", file=sys.stderr)
            return 2
        chaos = ChaosConfig(args.chaos_admin, args.kill_every, args.scale_every, *scale_range)
    elif args.kill_every or args.scale_every:
        print("msgr stress: --kill-every/--scale-every need --chaos-admin PATH",
              file=sys.stderr)
        return 2
    cfg = echo.StressConfig(
        chaos=chaos,
        stack=args.stack,
        memif_mode=args.memif_mode,
        auth=auth,
        target=target, conns=args.conns, messages=_message_cap(args),
        connect_timeout=args.connect_timeout, identity_check=args.identity,
        size_min=args.size_min, size_max=args.size_max, window=args.window,
        policy=args.policy, inject_socket_failures=args.inject_socket_failures,
        duration=args.duration, timeout=args.timeout, seed=args.seed,
        progress=args.json != JSON_STDOUT)
    stop = {"flag": False}

    def on_signal(_s: int, _f: object) -> None:
        stop["flag"] = True

    old = signal.signal(signal.SIGINT, on_signal)
    try:
        result = echo.run_stress(cfg, lambda: stop["flag"])
    except ValueError as err:
        print(f"msgr stress: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, old)
    data = asdict(result)
    data["ok"] = result.ok
    data["target"] = str(args.target)
    report(args.json, echo.format_summary(result), data)
    ok = result.ok and not (args.no_resets and (result.session_resets or result.connection_resets
                                                or result.connection_refused))
    return 0 if ok else 1
