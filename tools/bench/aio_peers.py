"""The pool/aio client as a ``msgr bench tcp`` peer (``aio-client``): ``window`` tasks
awaiting ``call`` in turn, against the epoll asyncmsgr echo server (tools/bench/tcp_peers.py)."""

from __future__ import annotations

import time

__all__ = ["client_aio"]


def client_aio(port: int, window: int, payload: bytes, duration: float,
               latencies: list[int] | None, limit: int = 1 << 62) -> int:
    """``window`` tasks, each awaiting ``conn.call`` in turn until ``duration`` (or
    ``limit`` requests in all); returns the replies counted."""
    import asyncio

    from pool.aio import connect
    from pool.api import Message

    async def main() -> int:
        done = 0
        started = 0
        deadline = time.monotonic() + duration
        async with connect(f"127.0.0.1:{port}") as conn:
            async def worker() -> None:
                nonlocal done, started
                while started < limit and time.monotonic() < deadline:
                    seq = started
                    started += 1
                    t0 = time.perf_counter_ns()
                    reply = await conn.call(Message(1, [seq, payload]), timeout=30)
                    assert reply.front[0] == seq
                    if latencies is not None:
                        latencies.append(time.perf_counter_ns() - t0)
                    done += 1
            await asyncio.gather(*(worker() for _ in range(min(window, limit))))
        return done

    return asyncio.run(main())
