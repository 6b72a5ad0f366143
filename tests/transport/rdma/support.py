"""Helpers shared by the rdma stack tests: connect a pair, pump non-blocking flows,
fork a child process. EMULATION: the tests run on the ``softverbs`` provider."""

from __future__ import annotations

import os
import select
import struct
import time
import traceback
from collections.abc import Callable

from transport.rdma.stack import RdmaConnectedSocket, RdmaServerSocket, RdmaStack
from transport.stack import ConnectedSocket

DEADLINE = 20.0

#: the length prefix of the echo tests' messages
LEN = struct.Struct("!I")


def wait_readable(fds: list[int], deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise AssertionError("deadline passed")
    select.select(fds, [], [], left)


def establish(stack: RdmaStack, path: str) -> tuple[RdmaServerSocket, RdmaConnectedSocket, RdmaConnectedSocket]:
    server = stack.listen(path)
    client = stack.connect(path)
    assert client.is_connected() == 1
    deadline = time.monotonic() + DEADLINE
    conn = server.accept()
    while conn is None:
        wait_readable([server.fileno()], deadline)
        conn = server.accept()
    return server, client, conn


def pump(socks: list[ConnectedSocket], step: Callable[[], bool], limit: float = DEADLINE) -> None:
    """Call ``step`` whenever one of the sockets is readable until it returns True."""
    deadline = time.monotonic() + limit
    while not step():
        wait_readable([s.fileno() for s in socks], deadline)


class Flow:
    """Sends ``data`` on ``sock`` and collects what arrives, non-blocking."""

    def __init__(self, sock: ConnectedSocket, data: bytes, read_size: int = 65536) -> None:
        self.sock, self.data, self.off = sock, memoryview(data), 0
        self.got = bytearray()
        self.buf = memoryview(bytearray(read_size))
        self.eof = False

    def step(self) -> None:
        while self.off < len(self.data):  # until the stack pushes back
            try:
                self.off += self.sock.send([self.data[self.off: self.off + 50000]])
            except BlockingIOError:
                break
        while not self.eof:
            try:
                n = self.sock.read_into(self.buf)
            except BlockingIOError:
                break
            if n == 0:
                self.eof = True
            self.got += self.buf[:n]


def raises(fn: Callable[[], object], exc: type[BaseException]) -> bool:
    try:
        fn()
    except exc:
        return True
    except BlockingIOError:
        return False
    return False


def fork_child(fn: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def echo_until_eof(conn: ConnectedSocket, limit: float = DEADLINE) -> None:
    """Send back whatever arrives on ``conn`` (64 KiB at a time) until the peer's EOF."""
    echo = Flow(conn, b"")
    pending = bytearray()

    def step() -> bool:
        echo.step()
        pending.extend(echo.got)
        echo.got.clear()
        while pending:
            try:
                del pending[: conn.send([bytes(pending[:65536])])]
            except (BlockingIOError, BrokenPipeError):
                break
        return echo.eof

    pump([conn], step, limit)
