"""The peers of ``msgr bench tcp``: echo servers and the clients that drive them.

Servers (each runs in its own process until SIGTERM): asyncmsgr (one Messenger), bare
asyncio and uvloop Protocols, a raw ``select.epoll`` loop (all three with a 4-byte length
prefix), pyzmq ROUTER, grpc.aio (streaming and unary,
tools/bench/grpc_peer.py). Bare servers decode the msgpack request and encode the reply, as
a real service would. Clients keep ``window`` requests in flight for a duration and, for
the instruction counts, up to a fixed number of requests.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack

from tools.bench.aio_peers import client_aio
from tools.bench.grpc_peer import client_stream, client_unary, serve_grpc

__all__ = ["SERVERS", "UNLIMITED", "messenger_client", "serve_messenger"]

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
    from pool.api import AuthSettings
    if not secure:
        return None
    return AuthSettings("secret", "secure", name, _BENCH_KEYRING)


def serve_messenger(addr: Any, ready: Callable[[], None], *, stack: Any = None,
                    auth: Any = None, name: str = "bench-server",
                    driver: str | None = None) -> None:
    """An echo Messenger (stateful server) at ``addr`` until SIGTERM; ``ready()`` once
    bound. ``driver``: the EventCenter's (None: epoll; "asyncio"/"uvloop": that loop)."""
    from pool.api import EntityType, EventCenter, Messenger, Policy
    from pool.apps import EchoDispatcher

    center = EventCenter(name=name, driver=driver)
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


def serve_asyncmsgr_asyncio(port: int, ready: Callable[[], None]) -> None:
    serve_messenger(("127.0.0.1", port), ready, driver="asyncio")


def serve_asyncmsgr_uvloop(port: int, ready: Callable[[], None]) -> None:
    serve_messenger(("127.0.0.1", port), ready, driver="uvloop")


# -- clients ---------------------------------------------------------------------------------

#: no request cap: the clients run for their duration (the instruction counts cap them)
UNLIMITED = 1 << 62


def _client_raw(port: int, window: int, payload: bytes, duration: float,
                latencies: list[int] | None, limit: int = UNLIMITED) -> int:
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
        if seq < limit and time.monotonic() < deadline and outstanding < window:
            parts = []
            while outstanding < window and seq < limit:
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
                latencies: list[int] | None, limit: int = UNLIMITED) -> int:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{port}")
    seq = done = outstanding = 0
    sent_at: dict[int, int] = {}
    deadline = time.monotonic() + duration
    while True:
        if seq < limit and time.monotonic() < deadline:
            while outstanding < window and seq < limit:
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
                             latencies: list[int] | None, limit: int = UNLIMITED) -> int:
    return _client_asyncmsgr(port, window, payload, duration, latencies, limit, secure=True)


def _client_asyncmsgr(port: int, window: int, payload: bytes, duration: float,
                      latencies: list[int] | None, limit: int = UNLIMITED,
                      secure: bool = False) -> int:
    return messenger_client(("127.0.0.1", port), window, payload, duration, latencies,
                            auth=_auth(secure, "client.bench"), limit=limit)


def messenger_client(addr: Any, window: int, payload: bytes, duration: float,
                     latencies: list[int] | None, *, stack: Any = None, auth: Any = None,
                     name: str = "bench-client", limit: int = UNLIMITED) -> int:
    """A lossless Messenger client keeping ``window`` echo requests in flight for
    ``duration`` seconds (and at most ``limit`` in all); returns the replies counted
    (and fills ``latencies`` in ns)."""
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
            if state["seq"] < limit and time.monotonic() < deadline:
                send(conn)

    m.add_dispatcher(Client())
    conn = m.connect(addr)
    for _ in range(min(window, limit)):
        send(conn)
    while state["outstanding"] > 0 and time.monotonic() < deadline + 10:
        center.process_events(0.1)
    m.shutdown()
    center.process_events(0)
    center.close()
    return state["done"]


SERVERS: dict[str, tuple[Callable[..., None], Callable[..., int], str | None]] = {
    "asyncmsgr": (serve_asyncmsgr, _client_asyncmsgr, None),
    # the same echo Messenger with its EventCenter on an asyncio / uvloop loop (issue 17)
    "asyncmsgr-asyncio": (serve_asyncmsgr_asyncio, _client_asyncmsgr, None),
    "asyncmsgr-uvloop": (serve_asyncmsgr_uvloop, _client_asyncmsgr, "uvloop"),
    # the pool/aio client (await call per request) against the epoll asyncmsgr server
    "aio-client": (serve_asyncmsgr, client_aio, None),
    "asyncmsgr-secure": (serve_asyncmsgr_secure, _client_asyncmsgr_secure, "cryptography"),
    "asyncio": (serve_asyncio, _client_raw, None),
    "uvloop": (serve_uvloop, _client_raw, "uvloop"),
    "epoll": (serve_epoll, _client_raw, None),
    "pyzmq": (serve_zmq, _client_zmq, "zmq"),
    "grpc-stream": (serve_grpc, client_stream, "grpc"),
    "grpc-unary": (serve_grpc, client_unary, "grpc"),
}

