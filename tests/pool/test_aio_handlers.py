"""Async handler apps in a real pool (``msgr serve --loop asyncio|uvloop --app M:fn``):
the handler awaits a real socket to another local server (an asyncio line server on the
test's loop, which the test also uses to hold handlers), driven by the pool/aio client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pool.aio import CallTimeout, connect
from pool.api import Message

from .support import msgr, running_pool

pytestmark = pytest.mark.timeout(120)


class Upstream:
    """A line server: answers ``up:<line>``; while ``gate`` is clear it holds every
    request, counting how many wait at once (the handlers running in the pool)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0
        self.peak = 0
        self.changed = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode().rstrip("\n")
        self.waiting += 1
        self.peak = max(self.peak, self.waiting)
        self.changed.set()
        await self.gate.wait()
        self.waiting -= 1
        writer.write(f"up:{line}\n".encode())
        await writer.drain()
        writer.close()

    async def wait_waiting(self, n: int) -> None:
        while self.waiting < n:
            self.changed.clear()
            await self.changed.wait()


def _with_upstream(tmp: Path, loop: str, body: Callable[[Upstream, int], Awaitable[None]],
                   concurrency: int = 64) -> None:
    async def main() -> None:
        up = Upstream()
        server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            # The pool is a child process; start it off the loop so the upstream serves.
            pool_cm = running_pool(tmp, 1, app="tests.pool.aio_apps:upstream",
                                   extra=("--loop", loop, "--app-config",
                                          json.dumps({"concurrency": concurrency})),
                                   env={"MSGR_TEST_UPSTREAM": str(port)})
            pool = await asyncio.to_thread(pool_cm.__enter__)
            try:
                await body(up, pool.port)
            finally:
                up.gate.set()
                await asyncio.to_thread(pool_cm.__exit__, None, None, None)
        finally:
            server.close()
            await server.wait_closed()
    asyncio.run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_handler_awaits_a_real_socket(tmp_path: Path, loop: str) -> None:
    async def body(_up: Upstream, port: int) -> None:
        async with connect(f"127.0.0.1:{port}") as conn:
            replies = await asyncio.gather(
                *(conn.call(Message(1, f"q{i}"), timeout=60) for i in range(200)))
            assert [r.front for r in replies] == [f"up:q{i}" for i in range(200)]
    _with_upstream(tmp_path, loop, body)


def test_concurrency_limit_holds_and_the_rest_complete(tmp_path: Path) -> None:
    async def body(up: Upstream, port: int) -> None:
        up.gate.clear()
        async with connect(f"127.0.0.1:{port}") as conn:
            calls = [asyncio.create_task(conn.call(Message(1, f"h{i}"), timeout=60))
                     for i in range(40)]
            await up.wait_waiting(4)
            # Four handlers are held upstream; the other 36 wait in the pool (paused
            # reading, then the dispatcher's queue): none may start until a slot frees.
            assert up.waiting == 4 and not any(c.done() for c in calls)
            up.gate.set()
            replies = await asyncio.gather(*calls)
            assert [r.front for r in replies] == [f"up:h{i}" for i in range(40)]
            assert up.peak == 4
    _with_upstream(tmp_path, "asyncio", body, concurrency=4)


def test_handler_exception_leaves_the_connection_serving(tmp_path: Path) -> None:
    async def body(_up: Upstream, port: int) -> None:
        async with connect(f"127.0.0.1:{port}") as conn:
            with pytest.raises(CallTimeout):
                await conn.call(Message(1, "boom"), timeout=1.0)
            with pytest.raises(CallTimeout):
                await conn.call(Message(1, "quiet"), timeout=1.0)
            assert (await conn.call(Message(1, "after"), timeout=30)).front == "up:after"
    _with_upstream(tmp_path, "asyncio", body)


def test_epoll_loop_refuses_an_async_app(tmp_path: Path) -> None:
    r = msgr("serve", "--loop", "epoll", "--bind", "127.0.0.1:0",
             "--app", "tests.pool.aio_apps:upstream", "--admin", str(tmp_path / "a.sock"))
    assert r.returncode == 2, r.stderr
    assert "async handlers need --loop asyncio or uvloop" in r.stderr
    assert not (tmp_path / "a.sock").exists()
