"""AcceptLoop: bounded accepts per wake-up, pause/resume/close, and the EMFILE back-off
(supervisors.md §2.3) forced for real by lowering RLIMIT_NOFILE in-process (restored)."""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
from collections.abc import Callable, Iterator

import pytest

from transport.event_center import EventCenter
from transport.listener import AcceptLoop
from transport.posix import PosixServerSocket, PosixStack
from transport.stack import Address, ConnectedSocket, ServerSocket


@pytest.fixture
def center() -> Iterator[EventCenter]:
    c = EventCenter(name="listener-test")
    yield c
    c.close()


@pytest.fixture
def server() -> Iterator[PosixServerSocket]:
    s = PosixStack().listen(("127.0.0.1", 0))
    yield s
    s.close()


@pytest.fixture
def accepted() -> Iterator[list[ConnectedSocket]]:
    got: list[ConnectedSocket] = []
    yield got
    for s in got:
        s.close()


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


def pump(center: EventCenter, done: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = EventCenter.now() + limit
    while not done():
        assert EventCenter.now() < deadline, "condition not reached in time"
        center.process_events(0.05)


def queue_connections(server: ServerSocket, n: int, into: list[socket.socket]) -> None:
    """Blocking connects: each returns once the handshake is done, i.e. the connection
    sits in the listener's accept queue."""
    addr = server.address
    assert isinstance(addr, tuple)
    for _ in range(n):
        into.append(socket.create_connection(addr, timeout=5))


def test_accepts_and_counts(center: EventCenter, server: PosixServerSocket,
                            accepted: list[ConnectedSocket], clients: list[socket.socket]) -> None:
    loop = AcceptLoop(center, server, accepted.append)
    loop.start()
    queue_connections(server, 5, clients)
    pump(center, lambda: len(accepted) == 5)
    assert loop.statistics().accepted == 5
    assert {s.peer_address for s in accepted} == {c.getsockname() for c in clients}
    loop.close()


def test_accepts_per_wakeup_are_bounded(center: EventCenter, server: PosixServerSocket,
                                        accepted: list[ConnectedSocket],
                                        clients: list[socket.socket]) -> None:
    loop = AcceptLoop(center, server, accepted.append, max_per_wakeup=2)
    queue_connections(server, 5, clients)
    loop.start()
    counts = []
    for timeout in (1.0, 1.0, 1.0, 0.0):  # the queue is already full: nothing blocks
        center.process_events(timeout)
        counts.append(len(accepted))
    assert counts == [2, 4, 5, 5]
    loop.close()


def test_pause_resume_close(center: EventCenter, server: PosixServerSocket,
                            accepted: list[ConnectedSocket], clients: list[socket.socket]) -> None:
    loop = AcceptLoop(center, server, accepted.append)
    loop.start()
    loop.pause()
    queue_connections(server, 2, clients)
    for _ in range(3):
        center.process_events(0)
    assert accepted == [] and loop.statistics().paused
    loop.resume()
    pump(center, lambda: len(accepted) == 2)
    loop.close()
    loop.close()  # idempotent
    queue_connections(server, 1, clients)
    for _ in range(3):
        center.process_events(0)
    assert len(accepted) == 2
    late = server.accept()  # the server socket was left open and still works
    assert late is not None
    late.close()
    with pytest.raises(RuntimeError):
        loop.start()


def test_on_accept_may_pause_from_inside(center: EventCenter, server: PosixServerSocket,
                                         accepted: list[ConnectedSocket],
                                         clients: list[socket.socket]) -> None:
    def take_one(sock: ConnectedSocket) -> None:
        accepted.append(sock)
        loop.pause()

    loop = AcceptLoop(center, server, take_one)
    queue_connections(server, 3, clients)
    loop.start()
    center.process_events(1.0)
    assert len(accepted) == 1
    loop.close()


def test_on_accept_failure_closes_socket_and_goes_on(
        center: EventCenter, server: PosixServerSocket, clients: list[socket.socket],
        caplog: pytest.LogCaptureFixture) -> None:
    given: list[ConnectedSocket] = []

    def broken(sock: ConnectedSocket) -> None:
        given.append(sock)
        raise RuntimeError("handler bug")

    loop = AcceptLoop(center, server, broken)
    loop.start()
    queue_connections(server, 2, clients)
    with caplog.at_level(logging.ERROR, logger="transport.listener"):
        pump(center, lambda: len(given) == 2)
    assert all(s.closed for s in given)  # type: ignore[attr-defined]
    assert sum("on_accept callback failed" in r.message for r in caplog.records) == 2
    loop.close()


def _lowest_free_fd(any_open_fd: int) -> int:
    fd = os.dup(any_open_fd)  # dup returns the lowest free number
    os.close(fd)
    return fd


def test_emfile_backs_off_and_rearms(center: EventCenter, server: PosixServerSocket,
                                     accepted: list[ConnectedSocket],
                                     clients: list[socket.socket]) -> None:
    """At RLIMIT_NOFILE accept fails with EMFILE and the listener stays readable: the
    loop must unregister (no spin), count the back-off, and re-arm on a timer."""
    loop = AcceptLoop(center, server, accepted.append, backoff=0.05)
    loop.start()
    queue_connections(server, 1, clients)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(server.fileno()), hard))  # no new fd
    try:
        center.process_events(1.0)
        stats = loop.statistics()
        assert stats.backoffs == 1 and stats.backing_off and stats.errors == 0
        before = center.statistics().file_callbacks
        for _ in range(20):
            center.process_events(0)  # the queued connection must not wake us
        assert center.statistics().file_callbacks == before
        assert accepted == []
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    pump(center, lambda: len(accepted) == 1)
    stats = loop.statistics()
    assert stats.backoffs == 1 and not stats.backing_off and stats.accepted == 1
    loop.close()


class _FlakyServer(ServerSocket):
    """A fake listener: readable through a socketpair, accept fails as scripted."""

    def __init__(self, failures: list[int]) -> None:
        self._r, self._w = socket.socketpair()
        self._w.send(b"!")  # permanently readable, like a listener with a queued connection
        self.failures = failures
        self.calls = 0

    def fileno(self) -> int:
        return self._r.fileno()

    def accept(self) -> ConnectedSocket | None:
        self.calls += 1
        if self.failures:
            err = self.failures.pop(0)
            raise OSError(err, os.strerror(err))
        return None

    def close(self) -> None:
        self._r.close()
        self._w.close()

    @property
    def address(self) -> Address:
        return "fake"


def test_repeated_capacity_errors_and_unexpected_errors(
        center: EventCenter, caplog: pytest.LogCaptureFixture) -> None:
    fake = _FlakyServer([errno.ENOBUFS, errno.ENFILE, errno.EBADF])
    loop = AcceptLoop(center, fake, lambda s: None, backoff=0.01)
    loop.start()
    with caplog.at_level(logging.WARNING, logger="transport.listener"):
        pump(center, lambda: fake.calls >= 4)
    stats = loop.statistics()
    assert stats.backoffs == 3 and stats.errors == 1
    loop.pause()  # cancels nothing pending, unregisters
    calls = fake.calls
    for _ in range(3):
        center.process_events(0)
    assert fake.calls == calls
    loop.close()
    fake.close()


def test_pause_cancels_a_pending_backoff(center: EventCenter) -> None:
    fake = _FlakyServer([errno.EMFILE])
    loop = AcceptLoop(center, fake, lambda s: None, backoff=0.01)
    loop.start()
    center.process_events(0)
    assert loop.statistics().backing_off
    loop.pause()
    assert not loop.statistics().backing_off
    loop.resume()  # re-registers at once
    center.process_events(0)
    assert fake.calls == 2
    loop.close()
    fake.close()


def test_argument_checks(center: EventCenter, server: PosixServerSocket) -> None:
    with pytest.raises(ValueError):
        AcceptLoop(center, server, lambda s: None, max_per_wakeup=0)
    with pytest.raises(ValueError):
        AcceptLoop(center, server, lambda s: None, backoff=0)
