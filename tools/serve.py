"""``msgr serve``: run a pool in the foreground until SIGTERM/SIGINT or ``msgr stop``."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Any

from pool.api import load_keyring
from pool.apps import DEFAULT_RETENTION as DEFAULT_CAPS, load_app
from pool.control.exit_codes import ExitCode
from pool.supervisor.admin import AdminError, default_admin_path
from pool.supervisor.arbiter import Supervisor
from pool.supervisor.config import ACCEPT_MODES, START_METHODS, PoolConfig
from pool.supervisor.lifecycle import Backoff
from pool.supervisor.systemd import ActivationError, inherited_sockets
from pool.worker.app import AppFactory
from pool.worker.config import LOOPS
from tools.common import parse_bind
from transport.asyncio_driver import require_uvloop

__all__ = ["load_factory", "register", "run"]


def load_factory(spec: str, config: dict[str, Any]) -> AppFactory:
    """Resolve ``--app``: a built-in name or MODULE:NAME (``pool.apps.load_app``)."""
    factory: AppFactory = load_app(spec, config)
    return factory



DEFAULT_BIND = "127.0.0.1:6800"


def _activation(bind: str | None) -> tuple[int, ...]:
    """The fds of systemd socket activation (``LISTEN_FDS``), checked; () without it."""
    try:
        inherited = inherited_sockets()
    except ActivationError as exc:
        raise ValueError(f"socket activation: {exc}") from None
    if inherited and bind is not None:
        raise ValueError(f"--bind {bind} and socket activation (LISTEN_FDS={len(inherited)}) were "
                         "both given: drop --bind to serve systemd's sockets, or unset LISTEN_FDS")
    return tuple(s.fd for s in inherited)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("serve", help="run a worker pool in the foreground")
    p.add_argument("--bind", default=None,
                   help="HOST:PORT (default 127.0.0.1:6800, or the sockets systemd passed: "
                        "LISTEN_FDS, see README 'systemd')")
    p.add_argument("--advertise", metavar="HOST:PORT", default=None,
                   help="the address this pool tells clients it has (SERVER_IDENT), when "
                        "they reach it through port forwarding (docker -p, a load balancer, "
                        "an SSH tunnel); default: the --bind address")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPUs)")
    p.add_argument("--accept", choices=ACCEPT_MODES, default="processor",
                   help="processor: the supervisor accepts and hands fds out (default); "
                        "reuseport: one SO_REUSEPORT listener per worker")
    p.add_argument("--app", default="echo", help="echo, kv or MODULE:CLASS (default echo)")
    p.add_argument("--loop", choices=LOOPS, default="epoll",
                   help="what each worker's event loop runs on: epoll (default), or a running "
                        "asyncio or uvloop loop that apps can await on")
    p.add_argument("--admin", default=None, help=f"admin socket path (default {default_admin_path()})")
    p.add_argument("--start-method", choices=START_METHODS, default="fork")
    p.add_argument("--inject-socket-failures", type=int, default=0, metavar="N",
                   help="apps fail one socket I/O in N (0 = off); passed as app config")
    p.add_argument("--app-config", default="{}", metavar="JSON", help="extra app config (a JSON object)")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0)
    p.add_argument("--boot-timeout", type=float, default=30.0)
    p.add_argument("--drain-timeout", type=float, default=10.0)
    p.add_argument("--graceful-timeout", type=float, default=5.0)
    p.add_argument("--flap-window", type=float, default=10.0)
    p.add_argument("--flap-max", type=int, default=3, help="deaths before READY in the window that fail a slot")
    p.add_argument("--backoff-cap", type=float, default=5.0)
    p.add_argument("--set-migrate-req", action="store_true",
                   help="reuseport: set net.ipv4.tcp_migrate_req=1 (root; system-wide)")
    p.add_argument("--metrics", metavar="HOST:PORT", default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (README 'Metrics')")
    g = p.add_argument_group("stacks")
    g.add_argument("--stack", choices=["posix", "dpdk", "rdma"], default="posix",
                   help="also serve memif (dpdk) or rdma clients: each worker listens at "
                        "--stack-path.<slot> beside TCP")
    g.add_argument("--stack-path", "--memif-socket", dest="stack_path", metavar="PATH",
                   help="base path of the per-worker memif/rdma endpoints")
    g.add_argument("--memif-mode", choices=["interrupt", "poll"], default="interrupt",
                   help="dpdk: poll = busy-poll every memif connection (DPDK's way: lowest "
                        "latency, a core per worker); interrupt = sleep until kicked")
    g = p.add_argument_group("security and limits")
    g.add_argument("--auth", choices=["none", "secret"], default="none")
    g.add_argument("--keyring", metavar="FILE", help="TOML keyring, mode 0600 (--auth secret)")
    g.add_argument("--name", default="osd.0", help="this pool's entity name in the keyring")
    g.add_argument("--mode", choices=["crc", "secure"], default="crc",
                   help="secure: AES-128-GCM on every frame (needs --auth secret)")
    g.add_argument("--max-connections", type=int, default=0, metavar="N",
                   help="per worker; beyond it clients are refused with EBUSY (0 = no cap)")
    g.add_argument("--handshake-timeout", type=float, default=10.0, metavar="S",
                   help="close connections that have not finished the handshake by then")
    g.add_argument("--idle-timeout", type=float, default=900.0, metavar="S")
    g.add_argument("--throttle-messages", type=int, default=0, metavar="N",
                   help="per worker: messages dispatched but not released (0 = no limit)")
    g.add_argument("--throttle-bytes", type=int, default=0, metavar="B")
    g = p.add_argument_group(
        "sessions kept for absent clients",
        "A lossless client's session outlives its socket so that it can resume; these "
        "caps bound what a worker keeps for clients that never come back. Over a cap "
        "the session idle longest is forgotten, and its client is told (SESSION_RESET, "
        "ms_handle_remote_reset) when it reconnects. 0 = no limit.")
    g.add_argument("--max-standby-sessions", type=int, default=DEFAULT_CAPS.max_sessions,
                   metavar="N", help="per worker (default %(default)s: far more clients "
                   "than fail at once; a real client is back within seconds)")
    g.add_argument("--max-standby-session-bytes", type=int,
                   default=DEFAULT_CAPS.max_session_bytes, metavar="B",
                   help="unacknowledged and queued bytes one such session may keep; one "
                        "over it is forgotten at once (default %(default)s = 16 MiB: above "
                        "what a busy live session has in flight when its socket fails, so "
                        "an ordinary fault never resets it)")
    g.add_argument("--max-standby-bytes", type=int, default=DEFAULT_CAPS.max_total_bytes,
                   metavar="B", help="all such sessions of a worker together (default "
                   "%(default)s = 64 MiB; the idle longest are forgotten first)")
    g.add_argument("--standby-timeout", type=float, default=900.0, metavar="S",
                   help="forget such a session after this long in any case (default 900)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        extra = json.loads(args.app_config)
        if not isinstance(extra, dict):
            raise ValueError("--app-config must be a JSON object")
        if args.loop == "uvloop":
            try:
                require_uvloop()  # now, with the reason, not a crash loop of workers
            except ImportError as exc:
                raise ValueError(str(exc)) from None
        if args.stack != "posix" and not args.stack_path:
            raise ValueError(f"--stack {args.stack} needs --stack-path PATH")
        if args.memif_mode != "interrupt" and args.stack != "dpdk":
            raise ValueError("--memif-mode applies to --stack dpdk only")
        auth = {"auth": args.auth, "mode": args.mode, "name": args.name}
        if args.auth == "secret":
            if not args.keyring:
                raise ValueError("--auth secret needs --keyring FILE")
            load_keyring(args.keyring)  # fail now, with the reason, not in every worker
            auth["keyring"] = os.path.abspath(args.keyring)
        elif args.mode == "secure":
            raise ValueError("--mode secure needs --auth secret and a --keyring")
        advertise = list(parse_bind(args.advertise, "--advertise")) if args.advertise else None
        if advertise is not None and advertise[0] in ("0.0.0.0", "::"):
            raise ValueError(f"--advertise {args.advertise}: name the host clients dial, "
                             "not a wildcard address")
        app_config = {
            "inject_socket_failures": args.inject_socket_failures,
            **({"advertise": advertise} if advertise else {}),
            "stack": args.stack, "stack_path": args.stack_path, "memif_mode": args.memif_mode,
            "loop": args.loop,
            "max_connections": args.max_connections,
            "ready_timeout": args.handshake_timeout, "idle_timeout": args.idle_timeout,
            "throttle_messages": args.throttle_messages, "throttle_bytes": args.throttle_bytes,
            "max_standby_sessions": args.max_standby_sessions,
            "max_standby_session_bytes": args.max_standby_session_bytes,
            "max_standby_bytes": args.max_standby_bytes, "standby_timeout": args.standby_timeout,
            **auth, **extra}
        listen_fds = _activation(args.bind)
        cfg = PoolConfig(
            bind=parse_bind(args.bind or DEFAULT_BIND), listen_fds=listen_fds,
            metrics=parse_bind(args.metrics, "--metrics") if args.metrics else None, workers=args.workers, accept=args.accept, app=args.app,
            admin_path=args.admin or default_admin_path(), start_method=args.start_method,
            app_config=app_config, heartbeat_timeout=args.heartbeat_timeout,
            boot_timeout=args.boot_timeout, drain_timeout=args.drain_timeout,
            graceful_timeout=args.graceful_timeout, flap_window=args.flap_window,
            flap_max=args.flap_max, backoff=Backoff(cap=args.backoff_cap),
            set_migrate_req=args.set_migrate_req)
        # Checked here, with the option names, rather than in every worker.
        for opt in ("max_standby_sessions", "max_standby_session_bytes", "max_standby_bytes"):
            if getattr(args, opt) < 0:
                raise ValueError(f"--{opt.replace('_', '-')} must be >= 0 (0 = no limit), "
                                 f"got {getattr(args, opt)}")
        if args.standby_timeout <= 0:
            raise ValueError(f"--standby-timeout must be > 0 seconds, got {args.standby_timeout}")
        factory = load_factory(args.app, app_config)
    except ValueError as exc:
        print(f"msgr serve: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        return Supervisor(cfg, factory).run()
    except AdminError as exc:
        print(f"msgr serve: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and "--metrics" not in str(exc):
            print(f"msgr serve: cannot listen on {args.bind or DEFAULT_BIND}: address already in use "
                  "(another pool or server is there): pick another --bind", file=sys.stderr)
        else:
            print(f"msgr serve: {exc}", file=sys.stderr)
        return ExitCode.ERROR
