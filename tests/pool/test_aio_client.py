"""The asyncio client against real servers: a pool of worker processes, and Messengers
on the test's own loop whose replies the test controls (for timeouts, cancellation and
resets). Every wait is on an event or a future, bounded by pytest-timeout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from pool.aio import (
    AioConnection,
    CallTimeout,
    ConnectionRefused,
    HandshakeError,
    SessionReset,
    connect,
)
from pool.api import (
    AsyncConnection,
    AuthSettings,
    Dispatcher,
    EntityType,
    Message,
    Messenger,
    Policy,
)
from tools.common import free_port
from transport.asyncio_driver import AsyncioDriver
from transport.event_center import EventCenter

from .support import running_pool

pytestmark = pytest.mark.timeout(60)


class _Held(Dispatcher):
    """Replies only when the test says so: ``release()`` answers everything held."""

    def __init__(self) -> None:
        self.held: list[tuple[AsyncConnection, Message]] = []
        self.arrived = asyncio.Event()

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        self.held.append((conn, msg))
        self.arrived.set()

    def release(self) -> int:
        n = len(self.held)
        for conn, msg in self.held:
            conn.send_message(Message(msg.type, msg.front, msg.data, tid=msg.tid))
        self.held.clear()
        self.arrived.clear()
        return n


@asynccontextmanager
async def _server(dispatcher: Dispatcher, port: int = 0, auth: AuthSettings | None = None
                  ) -> AsyncIterator[tuple[Messenger, int]]:
    center = EventCenter(driver=AsyncioDriver(asyncio.get_running_loop()), name="test-server")
    m = Messenger(center, entity_type=EntityType.OSD, policy=Policy.stateful_server(), auth=auth)
    m.add_dispatcher(dispatcher)
    addr = m.bind(("127.0.0.1", port))
    task = asyncio.get_running_loop().create_task(center.serve())
    try:
        assert isinstance(addr, tuple)
        yield m, addr[1]
    finally:
        m.shutdown()
        center.stop()
        await task
        center.close()


def _run(coro: Callable[[], object]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


def test_calls_to_a_pool_are_matched_by_tid(tmp_path: Path) -> None:
    with running_pool(tmp_path, 2, app="echo") as pool:
        async def main() -> None:
            async with connect(f"127.0.0.1:{pool.port}") as conn:
                replies = await asyncio.gather(
                    *(conn.call(Message(1, {"n": i}), timeout=20) for i in range(300)))
                assert [r.front["n"] for r in replies] == list(range(300))
                assert len({r.tid for r in replies}) == 300
        _run(main)


def test_send_waits_for_room_and_pushed_messages_arrive_in_order(tmp_path: Path) -> None:
    with running_pool(tmp_path, 1, app="echo") as pool:
        async def main() -> None:
            async with connect(f"127.0.0.1:{pool.port}", max_inflight=4) as conn:
                async def produce() -> None:
                    for i in range(500):
                        await conn.send(Message(2, i))
                        assert conn._inflight() <= 4  # noqa: SLF001 - the bound itself
                task = asyncio.create_task(produce())
                got = []
                async for msg in conn:  # echoes of tid-0 sends answer no call: pushed
                    got.append(msg.front)
                    if len(got) == 500:
                        break
                await task
                assert got == list(range(500))
        _run(main)


def test_a_timed_out_call_leaves_the_session_consistent() -> None:
    async def main() -> None:
        held = _Held()
        async with _server(held) as (_, port), connect(f"127.0.0.1:{port}") as conn:
            with pytest.raises(CallTimeout, match="late reply is dropped"):
                await conn.call(Message(1, "slow"), timeout=0.2)
            assert held.release() == 1  # the request did arrive, once
            call = asyncio.create_task(conn.call(Message(1, "next"), timeout=20))
            await held.arrived.wait()
            held.release()
            assert (await call).front == "next"
            assert conn.late_replies == 1  # the old reply was dropped, not misdelivered
    _run(main)


def test_a_cancelled_call_leaves_the_session_consistent() -> None:
    async def main() -> None:
        held = _Held()
        async with _server(held) as (_, port), connect(f"127.0.0.1:{port}") as conn:
            call = asyncio.create_task(conn.call(Message(1, "cancel me")))
            await held.arrived.wait()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            held.release()
            call = asyncio.create_task(conn.call(Message(1, "after"), timeout=20))
            await held.arrived.wait()
            held.release()
            assert (await call).front == "after"
            assert conn.late_replies == 1
    _run(main)


def test_a_server_restart_fails_calls_in_flight_with_session_reset() -> None:
    async def main() -> None:
        held = _Held()
        port = free_port()
        async with connect_after_server(held, port) as (conn, stop_server):
            call = asyncio.create_task(conn.call(Message(1, "lost"), timeout=30))
            await held.arrived.wait()
            await stop_server()  # the session dies with the server
            async with _server(EchoBack(), port):
                with pytest.raises(SessionReset, match="server reset the session"):
                    await call
                # the connection goes on with a new session
                assert (await conn.call(Message(1, "again"), timeout=20)).front == "again"
    _run(main)


class EchoBack(Dispatcher):
    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        conn.send_message(Message(msg.type, msg.front, msg.data, tid=msg.tid))


@asynccontextmanager
async def connect_after_server(dispatcher: Dispatcher, port: int
                               ) -> AsyncIterator[tuple[AioConnection, Callable[[], Awaitable[None]]]]:
    cm = _server(dispatcher, port)
    await cm.__aenter__()
    stopped = False

    async def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            await cm.__aexit__(None, None, None)

    try:
        async with connect(f"127.0.0.1:{port}") as conn:
            yield conn, stop
    finally:
        await stop()


def test_connecting_to_nothing_is_refused() -> None:
    async def main() -> None:
        with pytest.raises(ConnectionRefused, match="refused"):
            async with connect(f"127.0.0.1:{free_port()}", timeout=20):
                pass
    _run(main)


def test_an_auth_mismatch_is_a_handshake_error_with_its_reason() -> None:
    async def main() -> None:
        keyring = {"osd.0": b"k" * 32, "client.x": b"c" * 32}
        secure = AuthSettings("secret", "crc", "osd.0", keyring)
        async with _server(EchoBack(), auth=secure) as (_, port):
            with pytest.raises(HandshakeError) as info:
                async with connect(f"127.0.0.1:{port}", timeout=20):
                    pass
            assert info.value.kind == "auth"
    _run(main)


def test_bad_addresses_are_refused_with_the_text() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="'nowhere' must be HOST:PORT"):
            await connect("nowhere")
    _run(main)
