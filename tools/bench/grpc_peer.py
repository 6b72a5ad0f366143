"""gRPC peers for ``msgr bench tcp``: ``grpc.aio`` echo, bidirectional-streaming and unary.

What a Python team would pick for request/response between services. Messages are raw
bytes (no protobuf: generic handlers with identity serializers), holding the same msgpack
``[seq, payload]`` request as every other peer; the server decodes it and encodes the
reply, as the bare servers do. The streaming client keeps ``window`` requests in flight
on one stream; the unary client runs ``window`` concurrent calls on one channel.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack

__all__ = ["client_stream", "client_unary", "serve_grpc"]

_SERVICE = "asyncmsgr.bench.Echo"
_UNARY = f"/{_SERVICE}/Unary"
_STREAM = f"/{_SERVICE}/Stream"


def _echo(req: bytes) -> bytes:
    reply: bytes = msgpack.packb(msgpack.unpackb(req, raw=False), use_bin_type=True)
    return reply


def serve_grpc(port: int, ready: Callable[[], None]) -> None:
    """One grpc.aio server with both methods, until SIGTERM."""
    import grpc

    async def unary(req: bytes, _ctx: Any) -> bytes:
        return _echo(req)

    async def stream(reqs: AsyncIterator[bytes], _ctx: Any) -> AsyncIterator[bytes]:
        async for req in reqs:
            yield _echo(req)

    handler = grpc.method_handlers_generic_handler(_SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    })

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        if server.add_insecure_port(f"127.0.0.1:{port}") != port:
            raise RuntimeError(f"grpc could not bind 127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready()
        await stop.wait()
        await server.stop(None)

    asyncio.run(main())


class _Window:
    """Sequence numbers, the request cap and latencies shared by a client's senders."""

    def __init__(self, payload: bytes, duration: float, limit: int,
                 latencies: list[int] | None) -> None:
        self.payload = payload
        self.deadline = time.monotonic() + duration
        self.limit = limit
        self.latencies = latencies
        self.seq = 0
        self.done = 0
        self.sent_at: dict[int, int] = {}

    def next_request(self) -> bytes | None:
        if self.seq >= self.limit or time.monotonic() >= self.deadline:
            return None
        seq = self.seq
        self.seq += 1
        if self.latencies is not None:
            self.sent_at[seq] = time.perf_counter_ns()
        req: bytes = msgpack.packb([seq, self.payload], use_bin_type=True)
        return req

    def answered(self, reply: bytes) -> None:
        self.done += 1
        if self.latencies is not None:
            seq = msgpack.unpackb(reply, raw=False)[0]
            self.latencies.append(time.perf_counter_ns() - self.sent_at.pop(seq))


def client_stream(port: int, window: int, payload: bytes, duration: float,
                  latencies: list[int] | None, limit: int = 1 << 62) -> int:
    import grpc

    w = _Window(payload, duration, limit, latencies)

    async def main() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.stream_stream(_STREAM)()
            outstanding = 0
            for _ in range(window):
                req = w.next_request()
                if req is None:
                    break
                await call.write(req)
                outstanding += 1
            while outstanding:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise ConnectionError("grpc stream ended early")
                outstanding -= 1
                w.answered(reply)
                req = w.next_request()
                if req is not None:
                    await call.write(req)
                    outstanding += 1
            await call.done_writing()

    asyncio.run(main())
    return w.done


def client_unary(port: int, window: int, payload: bytes, duration: float,
                 latencies: list[int] | None, limit: int = 1 << 62) -> int:
    import grpc

    w = _Window(payload, duration, limit, latencies)

    async def main() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary(_UNARY)

            async def lane() -> None:
                while (req := w.next_request()) is not None:
                    w.answered(await call(req))

            await asyncio.gather(*(lane() for _ in range(window)))

    asyncio.run(main())
    return w.done
