"""AsyncioDriver inside a running loop: an EventCenter and asyncio tasks share one loop.

The EventCenter conformance tests (event_center/) run on this driver too, with
the loop driven by ``process_events``; here the loop runs and the center is awaited.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
import uvloop

from transport.asyncio_driver import UVLOOP_MISSING, AsyncioDriver, new_uvloop
from transport.event_center import READABLE, WRITABLE, EventCenter

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    lp = LOOPS[request.param]()
    yield lp
    lp.close()


def test_asyncio_socket_and_center_file_event_both_progress(loop: asyncio.AbstractEventLoop) -> None:
    """A task awaits a real asyncio TCP echo server on 127.0.0.1 while the same loop
    runs an EventCenter whose file event echoes over a socketpair: 50 round trips each,
    interleaved, with a center timer and an external event from another thread."""
    rounds = 50
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    log: list[str] = []

    async def main() -> None:
        center = EventCenter(driver=AsyncioDriver(), name="aio")  # the running loop
        assert center.driver_name in ("asyncio", "uvloop")

        def on_read(fd: int) -> None:
            data = a.recv(4096)
            log.append("center")
            a.send(data)  # echo back on the pair

        center.create_file_event(a.fileno(), READABLE, on_read)
        timer_fired = asyncio.Event()
        center.create_time_event(0.01, lambda: (log.append("timer"), timer_fired.set()))
        external = threading.Event()
        threading.Thread(target=center.dispatch_event_external,
                         args=(lambda: external.set(),), daemon=True).start()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        served = asyncio.ensure_future(center.serve(max_wait=30.0))

        async def asyncio_client() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for i in range(rounds):
                msg = b"tcp%03d" % i
                writer.write(msg)
                assert await reader.readexactly(len(msg)) == msg
                log.append("tcp")
            writer.close()
            await writer.wait_closed()

        async def pair_client() -> None:
            got = asyncio.Event()
            buf = bytearray()

            def on_b() -> None:
                buf.extend(b.recv(4096))
                got.set()

            asyncio.get_running_loop().add_reader(b.fileno(), on_b)
            try:
                for i in range(rounds):
                    msg = b"pair%03d" % i
                    buf.clear()
                    got.clear()
                    b.send(msg)
                    while bytes(buf) != msg:
                        await got.wait()
                        got.clear()
            finally:
                asyncio.get_running_loop().remove_reader(b.fileno())

        try:
            await asyncio.wait_for(asyncio.gather(asyncio_client(), pair_client(),
                                                  timer_fired.wait()), 10)
            assert await asyncio.to_thread(external.wait, 10)
        finally:
            center.delete_file_event(a.fileno(), READABLE)
            center.stop()
            await asyncio.wait_for(served, 10)
            server.close()
            await server.wait_closed()
            center.close()

    try:
        loop.run_until_complete(main())
    finally:
        a.close()
        b.close()
    assert log.count("tcp") == rounds and log.count("center") == rounds and "timer" in log
    # Interleaved, not one after the other: each side made progress while the other ran.
    first_tcp, last_center = log.index("tcp"), len(log) - 1 - log[::-1].index("center")
    assert first_tcp < last_center


def test_serve_runs_hooks_soon_and_write_events(loop: asyncio.AbstractEventLoop) -> None:
    """In serve mode WRITABLE callbacks come straight from add_writer, call_soon and loop
    hooks run in the center's passes, and stop() from another thread ends serve()."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    seen: list[str] = []

    async def main() -> None:
        center = EventCenter(driver=AsyncioDriver(asyncio.get_running_loop()))
        hooks = [0]
        center.add_loop_hook(lambda: hooks.__setitem__(0, hooks[0] + 1))

        def soon() -> None:
            seen.append("soon")  # a pass of the center: its hooks run after this
            threading.Thread(target=center.stop, daemon=True).start()

        def on_write(fd: int) -> None:
            seen.append("w")
            center.delete_file_event(fd, WRITABLE)
            center.call_soon(soon)

        center.create_file_event(w, WRITABLE, on_write)
        await asyncio.wait_for(center.serve(max_wait=30.0), 10)
        assert hooks[0] >= 1
        center.close()

    try:
        loop.run_until_complete(main())
    finally:
        os.close(r)
        os.close(w)
    assert seen[:2] == ["w", "soon"]


def test_serve_needs_an_asyncio_driver() -> None:
    with EventCenter(driver="epoll") as center, pytest.raises(TypeError, match="AsyncioDriver"):
        asyncio.run(center.serve())


def test_asyncio_driver_without_a_loop_needs_a_running_one() -> None:
    with pytest.raises(RuntimeError):
        AsyncioDriver()


def test_missing_uvloop_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what `import uvloop` sees when absent
    with pytest.raises(ImportError, match="pip install uvloop") as info:
        new_uvloop()
    assert str(info.value) == UVLOOP_MISSING
    with pytest.raises(ImportError, match="pip install uvloop"):
        EventCenter(driver="uvloop")
