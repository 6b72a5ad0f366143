"""``msgr bench tcp``: asyncmsgr against the servers a user would otherwise pick.

One run, one machine, the same msgpack request/response payloads for every server; one
client process drives one server process over loopback.

Servers: asyncmsgr (crc mode, lossless session, one Messenger), a bare asyncio Protocol
echo server, a bare uvloop one, a raw ``select.epoll`` loop (all three with a 4-byte
length prefix), and pyzmq DEALER/ROUTER. Bare servers decode the msgpack request and
encode the reply, as a real service would.

The client for the bare servers is a blocking socket loop that keeps ``window`` requests
in flight: it writes all missing requests with one ``sendall``, reads with ``recv_into``
into a preallocated buffer and parses every complete reply in it, so the client is never
the slower side by construction. The asyncmsgr client is a Messenger (it must speak
msgr2): that costs the client more CPU, which only hurts asyncmsgr's figure.

Per server: requests/s at window 1 and window 128, round-trip p50/p99 at window 1, the
server process's own CPU microseconds per request (utime+stime from /proc), and its peak
RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack

from tools.bench.common import (
    ForkedCall,
    fork_server,
    latency_us,
    proc_cpu,
    proc_hwm_kb,
)
from tools.common import free_port
from tools.progress import Progress

__all__ = ["register", "run", "SERVERS", "messenger_client"]

_LEN = struct.Struct("!I")


# -- servers (each runs in its own forked process until SIGTERM) ------------------------------

def _reply(frame: bytes | memoryview) -> bytes:
    req = msgpack.unpackb(frame, raw=False)
    body: bytes = msgpack.packb(req, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def _replies(buf: bytearray) -> bytes:
    """Answer every complete request in ``buf`` (consumed from it); b"" if none."""
    out = []
    pos, n = 0, len(buf)
    view = memoryview(buf)
    while n - pos >= 4:
        (ln,) = _LEN.unpack_from(buf, pos)
        if n - pos - 4 < ln:
            break
        out.append(_reply(view[pos + 4:pos + 4 + ln]))
        pos += 4 + ln
    view.release()
    if pos:
        del buf[:pos]
    return b"".join(out)


def serve_asyncio(port: int, ready: Callable[[], None], use_uvloop: bool = False) -> None:
    import asyncio

    if use_uvloop:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.buf = bytearray()

        def data_received(self, data: bytes) -> None:
            self.buf += data
            out = _replies(self.buf)
            if out:
                self.t.write(out)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", port)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        ready()
        async with server:
            await stop.wait()

    asyncio.run(main())


def serve_uvloop(port: int, ready: Callable[[], None]) -> None:
    serve_asyncio(port, ready, use_uvloop=True)


def serve_epoll(port: int, ready: Callable[[], None]) -> None:
    ls = socket.create_server(("127.0.0.1", port))
    ls.setblocking(False)
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    ready()
    while running[0]:
        try:
            events = ep.poll(0.2)
        except InterruptedError:
            continue
        for fd, _ev in events:
            if fd == ls.fileno():
                s, _ = ls.accept()
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[s.fileno()] = (s, bytearray())
                ep.register(s.fileno(), select.EPOLLIN)
                continue
            s, buf = conns[fd]
            try:
                data = s.recv(262144)
            except BlockingIOError:
                continue
            if not data:
                ep.unregister(fd)
                s.close()
                del conns[fd]
                continue
            buf += data
            out = _replies(buf)
            if out:
                s.setblocking(True)  # replies are small; the client reads them promptly
                s.sendall(out)
                s.setblocking(False)


def serve_zmq(port: int, ready: Callable[[], None]) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(f"tcp://127.0.0.1:{port}")
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    ready()
    poller = zmq.Poller()
    poller.register(s, zmq.POLLIN)
    while running[0]:
        if not poller.poll(200):
            continue
        while True:
            try:
                ident, body = s.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            req = msgpack.unpackb(body, raw=False)
            s.send_multipart([ident, msgpack.packb(req, use_bin_type=True)])
    s.close(0)
    ctx.term()


#: secure-mode runs share one random key; forked servers and clients inherit it
_BENCH_KEYRING = {"osd.0": os.urandom(32), "client.bench": os.urandom(32)}


def _auth(secure: bool, name: str) -> Any:
    from pool.auth import AuthSettings
    if not secure:
        return None
    return AuthSettings("secret", "secure", name, _BENCH_KEYRING)


def serve_messenger(addr: Any, ready: Callable[[], None], *, stack: Any = None,
                    auth: Any = None, name: str = "bench-server") -> None:
    """An echo Messenger (stateful server) at ``addr`` until SIGTERM; ``ready()`` once bound."""
    from pool.api import EntityType, EventCenter, Messenger, Policy
    from pool.apps import EchoDispatcher

    center = EventCenter(name=name)
    m = Messenger(center, entity_type=EntityType.OSD, policy=Policy.stateful_server(),
                  stack=stack, auth=auth)
    m.add_dispatcher(EchoDispatcher())
    m.bind(addr)
    signal.signal(signal.SIGTERM, lambda *_: center.stop())
    ready()
    center.run()
    m.shutdown()
    center.close()


def serve_asyncmsgr(port: int, ready: Callable[[], None], secure: bool = False) -> None:
    serve_messenger(("127.0.0.1", port), ready, auth=_auth(secure, "osd.0"))


# -- clients ---------------------------------------------------------------------------------

def _client_raw(port: int, window: int, payload: bytes, duration: float,
                latencies: list[int] | None) -> int:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    have = 0
    seq = 0
    done = 0
    outstanding = 0
    sent_at: dict[int, int] = {}
    deadline = time.monotonic() + duration
    while True:
        if time.monotonic() < deadline and outstanding < window:
            parts = []
            while outstanding < window:
                body = msgpack.packb([seq, payload], use_bin_type=True)
                parts.append(_LEN.pack(len(body)) + body)
                if latencies is not None:
                    sent_at[seq] = time.perf_counter_ns()
                seq += 1
                outstanding += 1
            s.sendall(b"".join(parts))
        elif outstanding == 0:
            break
        n = s.recv_into(view[have:])
        if n == 0:
            raise ConnectionError("server closed")
        have += n
        pos = 0
        while have - pos >= 4:
            (ln,) = _LEN.unpack_from(buf, pos)
            if have - pos - 4 < ln:
                break
            if latencies is not None:
                rseq = msgpack.unpackb(view[pos + 4:pos + 4 + ln], raw=False)[0]
                latencies.append(time.perf_counter_ns() - sent_at.pop(rseq))
            pos += 4 + ln
            done += 1
            outstanding -= 1
        if pos:
            buf[:have - pos] = buf[pos:have]
            have -= pos
    s.close()
    return done


def _client_zmq(port: int, window: int, payload: bytes, duration: float,
                latencies: list[int] | None) -> int:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{port}")
    seq = done = outstanding = 0
    sent_at: dict[int, int] = {}
    deadline = time.monotonic() + duration
    while True:
        if time.monotonic() < deadline:
            while outstanding < window:
                if latencies is not None:
                    sent_at[seq] = time.perf_counter_ns()
                s.send(msgpack.packb([seq, payload], use_bin_type=True))
                seq += 1
                outstanding += 1
        elif outstanding == 0:
            break
        reply = s.recv()
        if latencies is not None:
            rseq = msgpack.unpackb(reply, raw=False)[0]
            latencies.append(time.perf_counter_ns() - sent_at.pop(rseq))
        done += 1
        outstanding -= 1
    s.close(0)
    ctx.term()
    return done


def serve_asyncmsgr_secure(port: int, ready: Callable[[], None]) -> None:
    serve_asyncmsgr(port, ready, secure=True)


def _client_asyncmsgr_secure(port: int, window: int, payload: bytes, duration: float,
                             latencies: list[int] | None) -> int:
    return _client_asyncmsgr(port, window, payload, duration, latencies, secure=True)


def _client_asyncmsgr(port: int, window: int, payload: bytes, duration: float,
                      latencies: list[int] | None, secure: bool = False) -> int:
    return messenger_client(("127.0.0.1", port), window, payload, duration, latencies,
                            auth=_auth(secure, "client.bench"))


def messenger_client(addr: Any, window: int, payload: bytes, duration: float,
                     latencies: list[int] | None, *, stack: Any = None, auth: Any = None,
                     name: str = "bench-client") -> int:
    """A lossless Messenger client keeping ``window`` echo requests in flight for
    ``duration`` seconds; returns the replies counted (and fills ``latencies`` in ns)."""
    from pool.api import (
        AsyncConnection,
        Dispatcher,
        EntityType,
        EventCenter,
        Message,
        Messenger,
        Policy,
    )

    center = EventCenter(name=name)
    m = Messenger(center, entity_type=EntityType.CLIENT, policy=Policy.lossless_client(),
                  stack=stack, auth=auth)
    state = {"done": 0, "outstanding": 0, "seq": 0}
    sent_at: dict[int, int] = {}
    deadline = time.monotonic() + duration

    def send(conn: AsyncConnection) -> None:
        seq = state["seq"]
        state["seq"] = seq + 1
        state["outstanding"] += 1
        if latencies is not None:
            sent_at[seq] = time.perf_counter_ns()
        conn.send_message(Message(1, [seq, payload]))

    class Client(Dispatcher):
        def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
            state["done"] += 1
            state["outstanding"] -= 1
            if latencies is not None:
                latencies.append(time.perf_counter_ns() - sent_at.pop(msg.front[0]))
            if time.monotonic() < deadline:
                send(conn)

    m.add_dispatcher(Client())
    conn = m.connect(addr)
    for _ in range(window):
        send(conn)
    while state["outstanding"] > 0 and time.monotonic() < deadline + 10:
        center.process_events(0.1)
    m.shutdown()
    center.process_events(0)
    center.close()
    return state["done"]


SERVERS: dict[str, tuple[Callable[..., None], Callable[..., int], str | None]] = {
    "asyncmsgr": (serve_asyncmsgr, _client_asyncmsgr, None),
    "asyncmsgr-secure": (serve_asyncmsgr_secure, _client_asyncmsgr_secure, "cryptography"),
    "asyncio": (serve_asyncio, _client_raw, None),
    "uvloop": (serve_uvloop, _client_raw, "uvloop"),
    "epoll": (serve_epoll, _client_raw, None),
    "pyzmq": (serve_zmq, _client_zmq, "zmq"),
}


# -- process plumbing -------------------------------------------------------------------------

def _fork_server(kind: str, port: int) -> int:
    return fork_server(lambda ready: SERVERS[kind][0](port, ready), f"{kind} server")


def _run_client(kind: str, port: int, window: int, payload: bytes, duration: float,
                with_latency: bool) -> tuple[int, list[int], float]:
    """Run the client in a forked process; returns (requests, latencies ns, elapsed)."""
    def client() -> list[Any]:
        lat: list[int] | None = [] if with_latency else None
        t0 = time.monotonic()
        n = SERVERS[kind][1](port, window, payload, duration, lat)
        return [n, lat or [], time.monotonic() - t0]

    n, lat, elapsed = ForkedCall(client, f"{kind} client").result()
    return int(n), list(lat), float(elapsed)


def measure(kind: str, payload_size: int, duration: float) -> dict[str, Any]:
    port = free_port()
    pid = _fork_server(kind, port)
    payload = os.urandom(payload_size)
    try:
        _run_client(kind, port, 16, payload, min(0.3, duration), False)  # warm-up
        out: dict[str, Any] = {"server": kind, "payload": payload_size}
        n1, lat, t1 = _run_client(kind, port, 1, payload, duration, True)
        out["rps_w1"] = n1 / t1
        out["rtt_p50_us"] = latency_us(lat, 0.5)
        out["rtt_p99_us"] = latency_us(lat, 0.99)
        cpu0 = proc_cpu(pid)
        n128, _, t128 = _run_client(kind, port, 128, payload, duration, False)
        cpu1 = proc_cpu(pid)
        out["rps_w128"] = n128 / t128
        out["cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / max(1, n128)
        out["peak_rss_kb"] = proc_hwm_kb(pid)
        return out
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


def available(kind: str) -> str | None:
    """None if the peer can run, else why not."""
    mod = SERVERS[kind][2]
    if mod is None:
        return None
    try:
        __import__(mod)
    except ImportError as err:
        return f"missing: {err} (pip install -e '.[bench]')"
    return None


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for size in sorted({r["payload"] for r in rows if "payload" in r}):
        base = next((r for r in rows if r.get("server") == "asyncmsgr" and r["payload"] == size
                     and "rps_w128" in r), None)
        lines.append(f"\npayload {size} B")
        lines.append(f"  {'server':<17} {'req/s w128':>11} {'ratio':>6} {'req/s w1':>9} "
                     f"{'p50 µs':>8} {'p99 µs':>8} {'cpu µs/req':>10} {'ratio':>6} {'RSS MiB':>8}")
        for r in rows:
            if r.get("payload") != size:
                continue
            if "error" in r:
                lines.append(f"  {r['server']:<17} {r['error']}")
                continue
            ratio = f"{r['rps_w128'] / base['rps_w128']:.2f}" if base else "-"
            cratio = f"{r['cpu_us_per_req'] / base['cpu_us_per_req']:.2f}" if base else "-"
            lines.append(
                f"  {r['server']:<17} {r['rps_w128']:>11,.0f} {ratio:>6} {r['rps_w1']:>9,.0f} "
                f"{r['rtt_p50_us']:>8.0f} {r['rtt_p99_us']:>8.0f} {r['cpu_us_per_req']:>10.1f} "
                f"{cratio:>6} {r['peak_rss_kb'] / 1024:>8.1f}")
    lines.append("\nratio = peer / asyncmsgr (req/s: > 1 means the peer is faster; "
                 "cpu: > 1 means the peer uses more CPU per request)")
    return "\n".join(lines)


def register(sub: Any) -> None:
    p = sub.add_parser("tcp", help="asyncmsgr vs asyncio/uvloop/epoll/pyzmq over loopback")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON ('-': to stdout, alone)")
    p.add_argument("--plot", metavar="FILE.png")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--payloads", default="64,4096", help="comma-separated payload sizes")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds, each measuring every server in turn; figures are the "
                        "median over rounds (the per-round figures go to --json)")
    p.set_defaults(func=run)


_FIGURES = ("rps_w1", "rtt_p50_us", "rtt_p99_us", "rps_w128", "cpu_us_per_req", "peak_rss_kb")
# (what, figure, peer, target ratio asyncmsgr / peer, True when the ratio must be >= it)
_TARGETS = (
    ("req/s w128 vs uvloop", "rps_w128", "uvloop", 1.0, True),
    ("req/s w128 vs pyzmq", "rps_w128", "pyzmq", 2.0, True),
    ("server CPU/req vs epoll", "cpu_us_per_req", "epoll", 1.2, False),
    ("w1 RTT p50 vs asyncio", "rtt_p50_us", "asyncio", 1.1, False),
)


def median_rows(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (server, payload): the median of each figure over the rounds that
    measured it (an error row stands only if no round measured that pair)."""
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rounds[0]):
        same = [r[i] for r in rounds if "rps_w128" in r[i]]
        if not same:
            out.append(row)
            continue
        merged: dict[str, Any] = {"server": row["server"], "payload": row["payload"],
                                  "rounds": len(same)}
        for fig in _FIGURES:
            merged[fig] = statistics.median(r[fig] for r in same)
        out.append(merged)
    return out


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 5's targets at 64 B, read from ``rows``: ratio, target, met or not."""
    by = {r["server"]: r for r in rows if r.get("payload") == 64 and "rps_w128" in r}
    base = by.get("asyncmsgr")
    lines = []
    for what, fig, peer, target, higher in _TARGETS:
        other = by.get(peer)
        if base is None or other is None or not other[fig]:
            continue
        ratio = base[fig] / other[fig]
        met = ratio >= target if higher else ratio <= target
        sign = ">=" if higher else "<="
        lines.append(f"  {what:<26} {ratio:5.2f}x  (target {sign} {target}x: "
                     f"{'met' if met else 'NOT met'})")
    return ["\ntargets at 64 B (asyncmsgr / peer):", *lines] if lines else []


def run(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    servers = [s for s in args.servers.split(",") if s]
    unknown = [s for s in servers if s not in SERVERS]
    if unknown:
        print(f"msgr bench tcp: unknown servers {unknown}; choose from {list(SERVERS)}",
              file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("msgr bench tcp: --repeat must be >= 1", file=sys.stderr)
        return 2
    missing = {kind: available(kind) for kind in servers}
    rounds: list[list[dict[str, Any]]] = []
    sizes = [int(x) for x in args.payloads.split(",")]
    to_stdout = args.json == "-"  # the JSON alone on stdout: tables to stderr, no progress
    bar = Progress("bench tcp", args.repeat * len(sizes) * len(servers), "runs", enabled=not to_stdout)
    with bar:
        for rnd in range(args.repeat):
            rows = []
            for size in sizes:
                for kind in servers:
                    why = missing[kind]
                    if why:
                        rows.append({"server": kind, "payload": size, "error": why})
                    else:
                        bar.update(bar.completed, round=f"{rnd + 1}/{args.repeat}", now=f"{kind} {size} B")
                        try:
                            rows.append(measure(kind, size, args.duration))
                        except Exception as err:  # noqa: BLE001
                            rows.append({"server": kind, "payload": size, "error": f"failed: {err}"})
                    bar.update(bar.completed + 1)
            rounds.append(rows)
    rows = median_rows(rounds)
    out = sys.stderr if to_stdout else sys.stdout
    print(format_table(rows), "\n".join(target_lines(rows)), "", text_chart(rows), sep="\n", file=out)
    meta = {"machine": os.uname().release, "cpus": os.cpu_count(), "duration_s": args.duration,
            "repeat": args.repeat, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if to_stdout:
        print(json.dumps({"meta": meta, "results": rows, "rounds": rounds}))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows, "rounds": rounds}, f, indent=2)
    if args.plot:
        _plot(rows, args.plot)
    return 0


def text_chart(rows: list[dict[str, Any]], width: int = 40) -> str:
    """Bars of requests/s at window 128 per payload, as text (BENCHMARKS.md holds it)."""
    ok = [r for r in rows if "rps_w128" in r]
    lines = []
    for size in sorted({r["payload"] for r in ok}):
        rs = [r for r in ok if r["payload"] == size]
        top = max(r["rps_w128"] for r in rs)
        lines.append(f"requests/s, window 128, {size} B")
        for r in rs:
            bar = "#" * max(1, round(width * r["rps_w128"] / top))
            lines.append(f"  {r['server']:<17} {bar:<{width}} {r['rps_w128']:>9,.0f}")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install -e '.[bench]')", file=sys.stderr)
        return
    ok = [r for r in rows if "rps_w128" in r]
    sizes = sorted({r["payload"] for r in ok})
    fig, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 7), squeeze=False)
    panels = (("rps_w128", "requests/s, window 128"), ("cpu_us_per_req", "server CPU µs/request"))
    for row, (fig_key, title) in zip(axes, panels):
        for ax, size in zip(row, sizes):
            rs = [r for r in ok if r["payload"] == size]
            ax.bar([r["server"] for r in rs], [r[fig_key] for r in rs])
            ax.set_title(f"{title}, {size} B")
            ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path)
