"""A stack-agnostic conformance suite for :mod:`transport.stack` (trio's
``check_two_way_stream`` idea, Ceph's ``test_async_networkstack.cc`` checks).

Adding a stack
==============

Drop a module ``tests/conformance/stack_<name>.py`` that defines ``FACTORY`` (one object)
or ``FACTORIES`` (a list, e.g. one stack over TCP and over Unix sockets). Each object
follows :class:`StackFactory`::

    class MyFactory:
        name = "memif"                      # test id; unique across all stack modules
        skip_reason: str | None = None      # not None -> every check is skipped with it
                                            # (read after import, before setup: decide
                                            # here whether the hardware/library exists)
        def setup(self) -> None: ...        # per test, before anything else
        def teardown(self) -> None: ...     # per test, after every socket was closed;
                                            # must release all it made (fds, shm, children)
        def stack(self) -> NetworkStack: ...        # called once per test, after setup
        def listen_address(self) -> Address: ...    # a FRESH address each call, one that
                                                    # nobody listens on yet (port 0 is fine)
        # optional: called with the test's center before stack(), for stacks that add
        # pollers or doorbell fds to the center they run on
        def bind_center(self, center: EventCenter) -> None: ...

``tests/conformance/test_stacks.py`` discovers these modules and runs every check in
:data:`CHECKS` on every factory, in a fresh :class:`EventCenter` per test; the autouse
``no_leaks`` fixture then fails the test if the stack left an fd, a child process or a
shm segment behind. A module that fails to import fails only its own tests.

What the checks require of a stack (beyond ``transport/stack.py``'s contract):

* both sides of a connection are driven only through ``fileno()``/``write_fileno()``
  readiness on the one center of the test (plus any pollers the stack adds to that
  center: define ``bind_center``); client and server share that center and thread;
* a connect to an address whose listener was closed fails, either in ``connect`` or in
  a later ``is_connected``, with an :class:`OSError`;
* ``send`` may take fewer bytes than offered and raises :class:`BlockingIOError` once the
  peer stops reading (finite buffering: backpressure must reach the sender).
"""

from __future__ import annotations

import logging
import random
import struct
from collections import deque
from collections.abc import Callable
from typing import Protocol

from transport.event_center import READABLE, WRITABLE, EventCenter
from transport.stack import Address, ConnectedSocket, NetworkStack, ServerSocket

__all__ = ["CHECKS", "Endpoint", "Harness", "StackFactory"]


class StackFactory(Protocol):
    """What a ``stack_<name>.py`` module provides (see the module doc)."""

    name: str
    skip_reason: str | None

    def setup(self) -> None: ...
    def teardown(self) -> None: ...
    def stack(self) -> NetworkStack: ...
    def listen_address(self) -> Address: ...


class _ErrorTrap(logging.Handler):
    def __init__(self, sink: list[BaseException]) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.sink.append(record.exc_info[1])


class Harness:
    """One test's world: a factory, its stack, a center, and cleanup of every socket."""

    def __init__(self, factory: StackFactory, center: EventCenter) -> None:
        self.factory = factory
        self.center = center
        bind = getattr(factory, "bind_center", None)
        if bind is not None:
            bind(center)
        self.stack = factory.stack()
        self._owned: list[ConnectedSocket | ServerSocket] = []
        # The center logs callback exceptions and goes on (by design); a failed assertion
        # inside a callback must still fail the check at once, not after a timeout.
        self.callback_errors: list[BaseException] = []
        self._handler = _ErrorTrap(self.callback_errors)
        logging.getLogger("transport.event_center").addHandler(self._handler)

    def close(self) -> None:
        logging.getLogger("transport.event_center").removeHandler(self._handler)
        for s in reversed(self._owned):
            s.close()
        self._owned.clear()

    def pump(self, done: Callable[[], bool], limit: float = 20.0, what: str = "condition") -> None:
        """Run the center until ``done()``; fail after ``limit`` seconds (never hangs)."""
        deadline = EventCenter.now() + limit
        while True:
            if self.callback_errors:
                raise self.callback_errors[0]
            if done():
                return
            if EventCenter.now() > deadline:
                raise AssertionError(f"{self.factory.name}: {what} not reached in {limit}s")
            self.center.process_events(0.05)

    def listen(self) -> ServerSocket:
        server = self.stack.listen(self.factory.listen_address())
        self._owned.append(server)
        return server

    def connect(self, addr: Address) -> ConnectedSocket:
        """Connect and wait (event-driven) until ``is_connected() == 1``."""
        sock = self.stack.connect(addr)
        self._owned.append(sock)
        if sock.is_connected():
            return sock
        done: list[bool] = []
        wfd = sock.write_fileno()
        fd, mask = (wfd, WRITABLE) if wfd is not None else (sock.fileno(), READABLE)

        def check(_: int) -> None:
            if sock.is_connected():
                done.append(True)

        self.center.create_file_event(fd, mask, check)
        try:
            self.pump(lambda: bool(done) or bool(sock.is_connected()), what="connect")
        finally:
            self.center.delete_file_event(fd, mask)
        return sock

    def accept(self, server: ServerSocket, n: int = 1) -> list[ConnectedSocket]:
        got: list[ConnectedSocket] = []

        def on_accept(_: int) -> None:
            while len(got) < n:
                s = server.accept()
                if s is None:
                    return
                self._owned.append(s)
                got.append(s)

        self.center.create_file_event(server.fileno(), READABLE, on_accept)
        try:
            self.pump(lambda: len(got) >= n, what=f"{n} accepts")
        finally:
            self.center.delete_file_event(server.fileno(), READABLE)
        return got

    def pair(self) -> tuple[ConnectedSocket, ConnectedSocket]:
        """(client, server side) of one fresh connection."""
        server = self.listen()
        client = self.connect(server.address)
        return client, self.accept(server)[0]

    def endpoint(self, sock: ConnectedSocket, on_data: Callable[[bytes], None] | None = None,
                 *, reading: bool = True) -> Endpoint:
        return Endpoint(self.center, sock, on_data, reading=reading)


class Endpoint:
    """Drives one ConnectedSocket the way a worker does: READABLE always (unless paused),
    WRITABLE only while output is pending; honours ``write_fileno() is None``."""

    READ_SIZE = 65536

    def __init__(self, center: EventCenter, sock: ConnectedSocket,
                 on_data: Callable[[bytes], None] | None, *, reading: bool = True) -> None:
        self.center = center
        self.sock = sock
        self.on_data = on_data
        self.received = bytearray()
        self.eof = False
        self.sent = 0
        self.blocked = 0  # BlockingIOError count: proof of backpressure
        self.out: deque[memoryview] = deque()
        self.rfd = sock.fileno()
        self.wfd = sock.write_fileno()
        self._buf = memoryview(bytearray(self.READ_SIZE))
        self._reading = False
        self._writing = False
        if reading:
            self.resume_reading()

    def resume_reading(self) -> None:
        if not self._reading and not self.eof:
            self._reading = True
            self.center.create_file_event(self.rfd, READABLE, self._on_readable)

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            if self.wfd is None and self.out:
                return  # the read fd also signals send space: keep it (see stack.py)
            self.center.delete_file_event(self.rfd, READABLE)

    @property
    def pending(self) -> int:
        return sum(len(b) for b in self.out)

    def write(self, data: bytes | memoryview) -> None:
        if len(data):
            self.out.append(memoryview(data))
        self.flush()

    def flush(self) -> None:
        out = self.out
        while out:
            try:
                n = self.sock.send(list(out)[:256])
            except BlockingIOError:
                self.blocked += 1
                break
            self.sent += n
            while n:
                head = out[0]
                if n >= len(head):
                    n -= len(head)
                    out.popleft()
                else:
                    out[0] = head[n:]
                    n = 0
        self._want_write(bool(out))

    def _want_write(self, want: bool) -> None:
        if want == self._writing:
            return
        self._writing = want
        if self.wfd is not None:
            if want:
                self.center.create_file_event(self.wfd, WRITABLE, lambda _: self.flush())
            else:
                self.center.delete_file_event(self.wfd, WRITABLE)
        elif want and not self._reading:
            self.center.create_file_event(self.rfd, READABLE, self._on_readable)
        elif not want and not self._reading:
            self.center.delete_file_event(self.rfd, READABLE)

    def _on_readable(self, _: int) -> None:
        if self.wfd is None and self.out:
            self.flush()
        if not self._reading:
            return
        for _ in range(16):  # bounded per wake-up; level-triggered readiness brings us back
            try:
                n = self.sock.read_into(self._buf)
            except BlockingIOError:
                return
            if n == 0:
                self.eof = True
                self.pause_reading()
                return
            data = bytes(self._buf[:n])
            if self.on_data is not None:
                self.on_data(data)
            else:
                self.received += data

    def stop(self) -> None:
        """Unregister everything (before the socket is closed)."""
        self.center.delete_file_event(self.rfd, READABLE)
        if self.wfd is not None:
            self.center.delete_file_event(self.wfd, WRITABLE)
        self._reading = self._writing = False


# -- the checks ----------------------------------------------------------------------------


def check_simple_exchange(h: Harness) -> None:
    """Bytes flow both ways on one connection, intact (Ceph SimpleTest)."""
    client, conn = h.pair()
    a, b = h.endpoint(client), h.endpoint(conn)
    a.write(b"hello world 123456789")
    h.pump(lambda: len(b.received) == 21, what="21 bytes at the server")
    assert bytes(b.received) == b"hello world 123456789"
    b.write(b"and back")
    h.pump(lambda: len(a.received) == 8, what="reply")
    assert bytes(a.received) == b"and back"
    assert h.stack.name and isinstance(h.stack.name, str)
    a.stop()
    b.stop()


def check_eof_after_shutdown_and_close(h: Harness) -> None:
    """shutdown: the peer reads what was sent, then EOF (0); close is idempotent."""
    client, conn = h.pair()
    a, b = h.endpoint(client), h.endpoint(conn)
    a.write(b"last words")
    h.pump(lambda: len(b.received) == 10, what="data before EOF")
    client.shutdown()
    h.pump(lambda: b.eof, what="EOF after shutdown")
    assert bytes(b.received) == b"last words"
    a.stop()
    b.stop()
    client.close()
    client.close()
    # And the other direction ends by close alone.
    c2, s2 = h.pair()
    e2 = h.endpoint(s2)
    s2_peer = h.endpoint(c2, reading=False)
    s2_peer.write(b"bye")
    h.pump(lambda: len(e2.received) == 3, what="data before close")
    s2_peer.stop()
    c2.close()
    h.pump(lambda: e2.eof, what="EOF after close")
    e2.stop()


def check_refused_connect(h: Harness) -> None:
    """A connect to a closed listener fails with OSError (Ceph ConnectFailed/AcceptAndClose)."""
    server = h.listen()
    assert server.accept() is None  # nothing queued yet: EAGAIN -> None
    addr = server.address
    server.close()
    server.close()
    try:
        h.connect(addr)
    except OSError:
        return
    raise AssertionError(f"{h.factory.name}: connect to a closed listener succeeded")


def check_listen_address_in_use(h: Harness) -> None:
    """Two listeners on one concrete address: the second fails with OSError."""
    server = h.listen()
    try:
        dup = h.stack.listen(server.address)
    except OSError:
        return
    dup.close()
    raise AssertionError(f"{h.factory.name}: second listen on {server.address!r} succeeded")


def check_backpressure_and_partial_sends(h: Harness) -> None:
    """The sender sees BlockingIOError while the receiver does not read; once it reads,
    every byte arrives in order, whatever the partial-send boundaries were."""
    client, conn = h.pair()
    sender = h.endpoint(client, reading=False)
    receiver = h.endpoint(conn, reading=False)
    data = random.Random(7).randbytes(24 << 20)
    view = memoryview(data)
    sender.write(view[: 8 << 20])  # one big buffer...
    sender.write(view[8 << 20: 16 << 20])
    for off in range(16 << 20, 24 << 20, 1 << 20):  # ...then several, vectored
        sender.out.append(view[off: off + (1 << 20)])
    sender.flush()
    h.pump(lambda: sender.blocked > 0, what="backpressure (BlockingIOError)")
    for _ in range(5):
        h.center.process_events(0)  # the peer is not reading: no progress possible
    assert sender.pending > 0, "24 MiB vanished into an unbounded buffer"
    receiver.resume_reading()
    h.pump(lambda: len(receiver.received) == len(data), 60.0, "all 24 MiB")
    assert sender.pending == 0 and sender.sent == len(data)
    assert bytes(receiver.received) == data
    sender.stop()
    receiver.stop()


def check_many_small_buffers(h: Harness) -> None:
    """A send of thousands of tiny buffers (beyond IOV_MAX) is taken in part, in order."""
    client, conn = h.pair()
    a, b = h.endpoint(client), h.endpoint(conn)
    parts = [b"%06d;" % i for i in range(3000)]
    a.out.extend(memoryview(p) for p in parts)
    first = client.send(parts)  # a direct call too: must accept a plain list of bytes
    assert 0 < first <= len(b"".join(parts))
    expected = b"".join(parts)[:first] + b"".join(parts)
    a.flush()
    h.pump(lambda: len(b.received) == len(expected), what="all small buffers")
    assert bytes(b.received) == expected
    a.stop()
    b.stop()


_HDR = struct.Struct("!I")


def check_echo_stress(h: Harness, clients: int = 16, depth: int = 16,
                      messages: int = 2000, max_len: int = 1024) -> None:
    """Ceph StressTest: 16 clients x queue depth 16 against echo servers, ``messages``
    random messages of at most ``max_len`` bytes, each echo verified, in order."""
    server = h.listen()
    rng = random.Random(2024)
    echoes: list[Endpoint] = []
    socks: list[ConnectedSocket] = []
    for _ in range(clients):
        socks.append(h.connect(server.address))
    for conn in h.accept(server, clients):
        ep = h.endpoint(conn)
        ep.on_data = ep.write  # echo exactly what arrives
        echoes.append(ep)

    budget = [messages]
    verified = [0]

    class Client:
        def __init__(self, sock: ConnectedSocket) -> None:
            self.ep = h.endpoint(sock, self.on_data)
            self.inflight: deque[bytes] = deque()
            self.buf = bytearray()
            self.fill()

        def fill(self) -> None:
            while len(self.inflight) < depth and budget[0] > 0:
                budget[0] -= 1
                msg = rng.randbytes(rng.randint(1, max_len))
                self.inflight.append(msg)
                self.ep.write(_HDR.pack(len(msg)) + msg)

        def on_data(self, data: bytes) -> None:
            self.buf += data
            while len(self.buf) >= 4:
                (n,) = _HDR.unpack_from(self.buf)
                if len(self.buf) < 4 + n:
                    break
                got = bytes(self.buf[4: 4 + n])
                del self.buf[: 4 + n]
                assert self.inflight, "echo of a message never sent"
                assert got == self.inflight.popleft(), "echo corrupted or out of order"
                verified[0] += 1
            self.fill()

    cs = [Client(s) for s in socks]
    h.pump(lambda: verified[0] == messages, 60.0, f"{messages} verified echoes")
    assert all(not c.inflight and not c.buf for c in cs)  # message_left == 0
    for ep in echoes + [c.ep for c in cs]:
        ep.stop()


CHECKS: list[Callable[[Harness], None]] = [
    check_simple_exchange,
    check_eof_after_shutdown_and_close,
    check_refused_connect,
    check_listen_address_in_use,
    check_backpressure_and_partial_sends,
    check_many_small_buffers,
    check_echo_stress,
]
