"""EventCenter tests: ports of Ceph's ``test_async_driver.cc`` (notes §7.2) plus the
loop's own contract (failing callbacks, pollers, hooks); time and
the wait are in ``test_event_center_waits.py``.

Every wait is bounded; nothing sleeps to synchronise (threads meet on Events/joins).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import pytest

from tests.transport.event_center.support import DRIVERS, pump, record_waits
from transport.event_center import READABLE, WRITABLE, CenterStatistics, EventCenter

# -- Ceph EventDriverTest ----------------------------------------------------------------


def test_pipe_readiness(center: EventCenter, pipe: tuple[int, int]) -> None:
    """PipeTest: 0 events before a write, 1 after each write, 0 after delete."""
    r, w = pipe
    seen: list[bytes] = []
    center.create_file_event(r, READABLE, lambda fd: seen.append(os.read(fd, 100)))
    assert center.process_events(0) == 0
    for i in range(3):
        os.write(w, b"x%d" % i)
        assert center.process_events(0) == 1
        assert seen[-1] == b"x%d" % i
        assert center.process_events(0) == 0  # drained: level-triggered stays quiet
    center.delete_file_event(r, READABLE)
    os.write(w, b"y")
    assert center.process_events(0) == 0
    center.delete_file_event(r, READABLE)  # absent: no-op


def test_socket_listen_and_echo_by_toggling(center: EventCenter) -> None:
    """NetworkSocketTest: a listener fires readable on connect; echo toggles R then W."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.setblocking(False)
    cli = socket.create_connection(srv.getsockname(), timeout=5)
    accepted: list[socket.socket] = []
    center.create_file_event(srv.fileno(), READABLE, lambda fd: accepted.append(srv.accept()[0]))
    pump(center, lambda: bool(accepted))
    conn = accepted[0]
    conn.setblocking(False)
    pending = bytearray()

    def on_read(fd: int) -> None:
        pending.extend(conn.recv(4096))
        center.delete_file_event(fd, READABLE)
        center.create_file_event(fd, WRITABLE, on_write)

    def on_write(fd: int) -> None:
        del pending[: conn.send(pending)]
        if not pending:
            center.delete_file_event(fd, WRITABLE)
            center.create_file_event(fd, READABLE, on_read)

    center.create_file_event(conn.fileno(), READABLE, on_read)
    for msg in (b"ping", b"pong" * 100):
        cli.sendall(msg)
        got = b""
        cli.setblocking(False)
        while len(got) < len(msg):
            center.process_events(0.05)
            try:
                got += cli.recv(4096)
            except BlockingIOError:
                pass
        assert got == msg
    center.delete_file_event(conn.fileno(), READABLE | WRITABLE)
    center.delete_file_event(srv.fileno(), READABLE)
    for s in (conn, cli, srv):
        s.close()


def test_hup_fires_read_callback(center: EventCenter, pipe: tuple[int, int]) -> None:
    """ERR/HUP map to READABLE|WRITABLE: closing the writer wakes the reader (EOF)."""
    r, w = pipe
    seen: list[bytes] = []
    center.create_file_event(r, READABLE, lambda fd: seen.append(os.read(fd, 10)))
    os.close(w)
    assert center.process_events(0) == 1
    assert seen == [b""]
    center.delete_file_event(r, READABLE)


# -- Ceph EventCenterTest ----------------------------------------------------------------


def test_file_event_expansion(center: EventCenter) -> None:
    """FileEventExpansion: 300 sockets in a center sized for 100, all in one iteration."""
    pairs = [socket.socketpair() for _ in range(300)]
    try:
        fired: set[int] = set()
        for a, _ in pairs:
            center.create_file_event(a.fileno(), READABLE, fired.add)
        for _, b in pairs:
            b.send(b"!")
        assert center.process_events(1.0) == 300
        assert fired == {a.fileno() for a, _ in pairs}
        for a, _ in pairs:
            center.delete_file_event(a.fileno(), READABLE)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.parametrize("driver", DRIVERS)
def test_external_events_two_centers_two_threads(driver: str) -> None:
    """DispatchTest: 10,000 rounds of one external event to each of 2 worker threads;
    the counter returns to 0 every round."""
    centers = [EventCenter(driver=driver, name=f"w{i}") for i in range(2)]
    # max_wait=30: a lost wake-up fails the 5 s round wait instead of hiding in a 1 s poll.
    threads = [threading.Thread(target=c.run, kwargs={"max_wait": 30.0}, daemon=True)
               for c in centers]
    for t in threads:
        t.start()
    lock = threading.Lock()
    counter = [0]
    round_done = threading.Event()

    def work() -> None:
        with lock:
            counter[0] -= 1
            if counter[0] == 0:
                round_done.set()

    try:
        for _ in range(10_000):
            round_done.clear()
            with lock:
                counter[0] = 2
            for c in centers:
                c.dispatch_event_external(work)
            assert round_done.wait(5.0), "an external event was lost"
            assert counter[0] == 0
    finally:
        for c in centers:
            c.stop()
        for t in threads:
            t.join(5.0)
        assert not any(t.is_alive() for t in threads)
        for c in centers:
            c.close()
    assert sum(c.statistics().external_callbacks for c in centers) == 20_000



def test_call_soon_runs_next_iteration_without_waiting(center: EventCenter) -> None:
    ran: list[int] = []

    def first() -> None:
        ran.append(1)
        center.call_soon(lambda: ran.append(2))

    center.call_soon(first)
    start = time.monotonic()
    assert center.process_events(10.0) == 1
    assert center.process_events(10.0) == 1
    assert time.monotonic() - start < 5.0  # neither iteration blocked
    assert ran == [1, 2]


def test_stop_from_another_thread(center: EventCenter) -> None:
    started = threading.Event()
    center.dispatch_event_external(started.set)
    t = threading.Thread(target=center.run, kwargs={"max_wait": 30.0}, daemon=True)
    t.start()
    assert started.wait(5.0)
    assert not center.in_thread()
    center.stop()
    t.join(5.0)
    assert not t.is_alive()


def test_stop_before_run_returns_at_once(center: EventCenter) -> None:
    center.stop()
    center.run(max_wait=30.0)  # must not block
    ran: list[int] = []

    def once() -> None:
        ran.append(1)
        center.stop()

    center.call_soon(once)
    center.run(max_wait=30.0)  # the flag was reset: runs until the callback stops it
    assert ran == [1]


# -- callbacks that misbehave ------------------------------------------------------------


def test_raising_callbacks_do_not_kill_the_loop(
        center: EventCenter, pipe: tuple[int, int], caplog: pytest.LogCaptureFixture) -> None:
    r, w = pipe
    ok: list[str] = []

    def boom(*_: object) -> None:
        raise RuntimeError("boom")

    center.create_file_event(r, READABLE, boom)
    os.write(w, b"x")
    center.create_time_event(0, boom)
    center.create_time_event(0, lambda: ok.append("timer"))
    center.dispatch_event_external(boom)
    center.dispatch_event_external(lambda: ok.append("external"))
    center.call_soon(boom)
    center.call_soon(lambda: ok.append("soon"))
    hook = center.add_loop_hook(boom)
    with caplog.at_level(logging.ERROR, logger="transport.event_center"):
        center.process_events(0.1)
        center.process_events(0)
    assert sorted(ok) == ["external", "soon", "timer"]
    failures = [rec for rec in caplog.records if rec.name == "transport.event_center"]
    assert len(failures) >= 5
    assert all(rec.exc_info and rec.exc_info[0] is RuntimeError for rec in failures)
    center.remove_loop_hook(hook)
    center.delete_file_event(r, READABLE)


def test_delete_from_callback_skips_later_dispatch(center: EventCenter) -> None:
    """A callback deletes another fd's event and its own write event: neither runs."""
    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    try:
        calls: list[str] = []

        def first(fd: int) -> None:
            calls.append("first")
            center.delete_file_event(a1.fileno(), READABLE | WRITABLE)
            center.delete_file_event(b1.fileno(), READABLE | WRITABLE)

        def second(fd: int) -> None:
            calls.append("second")
            center.delete_file_event(a1.fileno(), READABLE | WRITABLE)
            center.delete_file_event(b1.fileno(), READABLE | WRITABLE)

        a2.send(b"x")
        b2.send(b"x")
        for s, cb in ((a1, first), (b1, second)):
            center.create_file_event(s.fileno(), READABLE, cb)
            center.create_file_event(s.fileno(), WRITABLE, lambda fd: calls.append("write"))
        assert center.process_events(1.0) == 1
        assert len(calls) == 1
        assert center.process_events(0) == 0
    finally:
        for s in (a1, a2, b1, b2):
            s.close()


def test_reregistering_replaces_callback_and_keeps_directions_apart(center: EventCenter) -> None:
    a, b = socket.socketpair()
    try:
        calls: list[str] = []
        center.create_file_event(a.fileno(), READABLE, lambda fd: calls.append("r1"))
        center.create_file_event(a.fileno(), READABLE, lambda fd: calls.append("r2"))
        center.create_file_event(a.fileno(), WRITABLE, lambda fd: calls.append("w"))
        assert center.process_events(0) == 1  # writable only
        b.send(b"x")
        assert center.process_events(0) == 2
        assert calls == ["w", "r2", "w"]
        center.delete_file_event(a.fileno(), WRITABLE)
        assert center.process_events(0) == 1
        assert calls[-1] == "r2"
        center.delete_file_event(a.fileno(), READABLE)
        with pytest.raises(ValueError):
            center.create_file_event(a.fileno(), 4, lambda fd: None)
    finally:
        a.close()
        b.close()


def test_same_callback_for_both_directions_runs_once(center: EventCenter) -> None:
    a, b = socket.socketpair()
    try:
        calls: list[int] = []
        center.create_file_event(a.fileno(), READABLE | WRITABLE, calls.append)
        b.send(b"x")
        assert center.process_events(0) == 1
        assert calls == [a.fileno()]
        center.delete_file_event(a.fileno(), READABLE | WRITABLE)
    finally:
        a.close()
        b.close()


def test_delete_after_close_is_tolerated(center: EventCenter) -> None:
    a, b = socket.socketpair()
    fd = a.fileno()
    center.create_file_event(fd, READABLE, lambda fd: None)
    a.close()
    b.close()
    center.delete_file_event(fd, READABLE)  # the kernel already dropped it
    assert center.process_events(0) == 0


# -- pollers and hooks -------------------------------------------------------------------


def test_pollers_make_the_loop_non_blocking(center: EventCenter) -> None:
    work = [3]

    def poll() -> bool:
        if work[0]:
            work[0] -= 1
            return True
        return False

    pid = center.add_poller(poll)
    start = time.monotonic()
    results = [center.process_events(30.0) for _ in range(5)]
    assert time.monotonic() - start < 5.0  # never blocked for the 30 s asked
    assert results == [1, 1, 1, 0, 0]
    center.remove_poller(pid)
    center.remove_poller(pid)


def test_idle_pollers_fall_back_to_a_short_blocking_wait(
        center: EventCenter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(center, "poller_idle_spins", 3)
    monkeypatch.setattr(center, "KERNEL_POLL_INTERVAL", 0.0)  # every pass asks the kernel
    waits = record_waits(center)
    pid = center.add_poller(lambda: False)
    for _ in range(5):
        center.process_events(30.0)
    assert waits[:3] == [0, 0, 0]
    assert waits[3] == round(center.POLLER_IDLE_WAIT * 1000)
    center.remove_poller(pid)


def test_loop_hooks_run_once_per_iteration(center: EventCenter) -> None:
    counts = [0, 0]
    h0 = center.add_loop_hook(lambda: counts.__setitem__(0, counts[0] + 1))
    h1 = center.add_loop_hook(lambda: counts.__setitem__(1, counts[1] + 1))
    base = center.loop_count
    for _ in range(4):
        center.process_events(0)
    center.remove_loop_hook(h1)
    center.process_events(0)
    assert counts == [5, 4]
    assert center.loop_count == base + 5
    center.remove_loop_hook(h0)


# -- misc ----------------------------------------------------------------------------------


def test_statistics_and_close(center: EventCenter) -> None:
    center.call_soon(lambda: None)
    center.process_events(0)
    center.process_events(0)
    stats = center.statistics()
    assert isinstance(stats, CenterStatistics)
    assert stats.loops == 2 and stats.external_callbacks == 1 and stats.empty_wakeups == 1
    assert stats.busy_seconds >= 0
    with pytest.raises(AttributeError):
        stats.loops = 0  # type: ignore[misc]
    assert center.in_thread()
    center.close()
    center.close()  # idempotent
    center.stop()  # after close: harmless


def test_unknown_driver() -> None:
    with pytest.raises(ValueError):
        EventCenter(driver="kqueue-on-linux")



def test_busy_polling_asks_the_kernel_less_often_but_still_delivers_fd_events(
        center: EventCenter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(center, "KERNEL_POLL_INTERVAL", 0.05)
    calls = record_waits(center)
    pid = center.add_poller(lambda: True)  # always busy
    r, w = os.pipe()
    seen: list[int] = []
    center.create_file_event(r, READABLE, lambda fd: seen.append(len(os.read(fd, 10))))
    os.write(w, b"x")
    start = time.monotonic()
    passes = 0
    while not seen and time.monotonic() - start < 5.0:
        center.process_events(1.0)
        passes += 1
    assert seen == [1]
    assert calls == [0] * len(calls) and len(calls) <= 2
    # later passes ask the kernel at most once per interval, not once per pass
    for _ in range(200):
        center.process_events(1.0)
    assert len(calls) < 200
    center.delete_file_event(r, READABLE)
    center.remove_poller(pid)
    os.close(r)
    os.close(w)


def test_fire_file_event_runs_the_read_callback_without_the_kernel(center: EventCenter) -> None:
    r, w = os.pipe()
    got: list[int] = []
    center.create_file_event(r, READABLE, got.append)
    assert center.fire_file_event(r) is True
    assert got == [r]  # ran although the pipe is empty: readiness came from user space
    center.delete_file_event(r, READABLE)
    assert center.fire_file_event(r) is False  # nobody reading: the caller keeps the level
    os.close(r)
    os.close(w)
