"""``pause_reading`` is one of three independent reasons a connection stops reading.

The other two, the dispatch throttle and write backpressure, release themselves; their
release must not undo the owner's pause (an async handler at its concurrency limit, a
drain waiting at a frame boundary), and ``resume_reading`` must not undo theirs. Real
loopback sockets, one EventCenter, bounded waits on observable conditions."""

from __future__ import annotations

import fcntl
import struct
import termios
from collections.abc import Callable, Iterator

import pytest

from pool.api import AsyncConnection, Dispatcher, Message, Messenger, MessengerConfig
from protocol.features import EntityType
from protocol.policy import Policy
from transport.event_center import EventCenter

from .test_messenger import Harness, Recorder, addr_of

BIG = 1 << 20
HIGH_WATER = 256 * 1024


def _unread_bytes(conn: AsyncConnection) -> int:
    """Bytes the kernel holds for ``conn``'s socket that nobody has read (FIONREAD)."""
    assert conn.sock is not None
    buf = fcntl.ioctl(conn.sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


class _Keep(Recorder):
    """Records, and remembers the server side of the one connection."""

    def __init__(self) -> None:
        super().__init__()
        self.conn: AsyncConnection | None = None

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        self.conn = conn
        super().ms_dispatch(conn, msg)


@pytest.fixture
def h() -> Iterator[Harness]:
    center = EventCenter()
    harness = Harness(center)
    yield harness
    harness.close()
    center.close()


def _pair(h: Harness, server_config: dict[str, int] | None = None,
          ) -> tuple[Messenger, _Keep, AsyncConnection, Recorder, AsyncConnection]:
    sd, cd = _Keep(), Recorder()
    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), sd, bind=True,
                      **(server_config or {}))
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), cd)
    conn = cli.connect(addr_of(srv))
    conn.send_message(Message(1, 0))
    h.wait_for(lambda: sd.total() == 1)
    assert sd.conn is not None
    return srv, sd, sd.conn, cd, conn


def test_paused_connection_reads_nothing_until_resumed(h: Harness) -> None:
    _srv, sd, sconn, _cd, conn = _pair(h)
    sconn.pause_reading()
    assert sconn.reading_paused
    for i in range(1, 11):
        conn.send_message(Message(1, i))
    h.wait_for(lambda: _unread_bytes(sconn) > 0)
    for _ in range(5):
        h.center.process_events(0.01)
    assert sd.total() == 1 and _unread_bytes(sconn) > 0
    sconn.resume_reading()
    assert not sconn.reading_paused
    h.wait_for(lambda: sd.total() == 11)
    assert sd.received[sconn] == list(range(11))


def test_write_backpressure_release_keeps_the_owners_pause(h: Harness) -> None:
    srv, sd, sconn, cd, conn = _pair(h, {"out_high_water": HIGH_WATER})
    # The client stops reading, so the server's replies pile up past its high water.
    conn.pause_reading()
    for _ in range(8):
        sconn.send_message(Message(2, None, data=bytes(BIG)))
    h.wait_for(lambda: srv.stats["write_backpressure"] >= 1)
    assert sconn.reading_paused  # write backpressure holds
    sconn.pause_reading()        # and now the owner's pause too
    for i in range(1, 6):
        conn.send_message(Message(1, i))
    # The client reads again: the server's output drains and backpressure releases.
    conn.resume_reading()
    h.wait_for(lambda: cd.total() == 8, timeout=20.0)
    h.wait_for(lambda: _unread_bytes(sconn) > 0)
    for _ in range(5):
        h.center.process_events(0.01)
    assert sconn.reading_paused, "the backpressure release undid pause_reading"
    assert sd.total() == 1
    sconn.resume_reading()
    h.wait_for(lambda: sd.total() == 6)
    assert sd.received[sconn] == list(range(6))


class _Gate(Dispatcher):
    """Holds every message (throttle charged) until ``release_all``."""

    def __init__(self) -> None:
        self.msgr: Messenger | None = None
        self.conn: AsyncConnection | None = None
        self.seen: list[int] = []
        self.held: list[Callable[[], None]] = []

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        assert self.msgr is not None
        self.conn = conn
        self.seen.append(msg.front)
        self.held.append(self.msgr.hold(msg))

    def release_all(self) -> None:
        held, self.held = self.held, []
        for release in held:
            release()


def test_resume_reading_does_not_undo_the_throttle(h: Harness) -> None:
    gate = _Gate()
    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), gate, bind=True,
                      throttle_messages=2)
    gate.msgr = srv
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), Recorder())
    conn = cli.connect(addr_of(srv))
    for i in range(6):
        conn.send_message(Message(1, i))
    h.wait_for(lambda: len(gate.seen) == 2)  # the throttle admits two
    sconn = gate.conn
    assert sconn is not None and sconn.reading_paused
    sconn.pause_reading()
    sconn.resume_reading()  # the owner's pause ends; the throttle's does not
    for _ in range(5):
        h.center.process_events(0.01)
    assert len(gate.seen) == 2 and sconn.reading_paused
    while len(gate.seen) < 6:
        before = len(gate.seen)
        gate.release_all()
        h.wait_for(lambda: len(gate.seen) > before)
    assert gate.seen == list(range(6))
    gate.release_all()
