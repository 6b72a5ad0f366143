"""EventCenter tests of time: timers, the bounded wait and its millisecond rounding,
and the sleep handshake between the loop and producers on other threads.

Every wait is bounded; nothing sleeps to synchronise (threads meet on Events/joins).
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.transport.event_center.support import pump, record_waits
from transport.event_center import EventCenter

# -- time events -------------------------------------------------------------------------


def test_time_events_order_and_delete(center: EventCenter) -> None:
    order: list[str] = []
    center.create_time_event(0.003, lambda: order.append("c"))
    center.create_time_event(0.001, lambda: order.append("a"))
    dropped = center.create_time_event(0.002, lambda: order.append("dropped"))
    center.create_time_event(0.002, lambda: order.append("b"))
    center.delete_time_event(dropped)
    center.delete_time_event(dropped)  # twice: no-op
    center.delete_time_event(10_000)  # unknown: no-op
    pump(center, lambda: len(order) == 3)
    assert order == ["a", "b", "c"]
    assert center.statistics().time_callbacks == 3


def test_time_event_not_early(center: EventCenter) -> None:
    fired: list[float] = []
    start = EventCenter.now()
    center.create_time_event(0.02, lambda: fired.append(EventCenter.now()))
    pump(center, lambda: bool(fired))
    assert fired[0] - start >= 0.02


def test_many_deleted_timers_are_compacted(center: EventCenter) -> None:
    fired: list[int] = []
    ids = [center.create_time_event(60.0, lambda: fired.append(0)) for _ in range(500)]
    for i in ids:
        center.delete_time_event(i)
    assert len(center._heap) < 500  # tombstones compacted, not kept forever
    center.create_time_event(0.0, lambda: fired.append(1))
    pump(center, lambda: bool(fired))
    assert fired == [1]


def test_sub_resolution_timer_does_not_spin(center: EventCenter) -> None:
    """Ceph PR #53477: a 0.3 ms remainder must not become epoll_wait(0) in a loop."""
    waits = record_waits(center)
    fired: list[bool] = []
    before = center.statistics()
    center.create_time_event(0.0003, lambda: fired.append(True))
    pump(center, lambda: bool(fired))
    after = center.statistics()
    assert after.loops - before.loops <= 3
    assert after.empty_wakeups - before.empty_wakeups <= 3
    assert waits[0] == 1  # rounded up to the drivers' 1 ms, never truncated to 0


def test_timeout_bounds_the_wait(center: EventCenter) -> None:
    start = time.monotonic()
    assert center.process_events(0.01) == 0
    assert time.monotonic() - start >= 0.01


# -- external events, call_soon, stop ----------------------------------------------------


def test_external_wakeup_written_once_per_sleep(center: EventCenter) -> None:
    """The sleep handshake: only a producer that sees the loop asleep writes the
    eventfd, and the first one clears the flag so a burst costs one syscall."""
    wakes: list[int] = []
    real_wake = center._wake

    def counting_wake() -> None:
        wakes.append(1)
        real_wake()

    center._wake = counting_wake  # type: ignore[method-assign]
    ran: list[int] = []
    center.dispatch_event_external(lambda: ran.append(0))
    assert wakes == []  # loop awake: no syscall
    center._sleeping = True  # as if the loop were blocked in epoll_wait
    for i in range(1, 101):
        center.dispatch_event_external(lambda i=i: ran.append(i))  # type: ignore[misc]
    assert wakes == [1]
    assert center.process_events(1.0) == 101
    assert ran == list(range(101))
    assert center.process_events(0) == 0  # the eventfd was drained


def test_external_event_wakes_a_sleeping_loop() -> None:
    c = EventCenter()
    t = threading.Thread(target=c.run, kwargs={"max_wait": 30.0}, daemon=True)
    t.start()
    done = threading.Event()
    try:
        for _ in range(100):
            done.clear()
            c.dispatch_event_external(done.set)
            assert done.wait(5.0)
    finally:
        c.stop()
        t.join(5.0)
        c.close()
    assert not t.is_alive()

def test_wait_is_whole_milliseconds_rounded_up(center: EventCenter) -> None:
    waits = record_waits(center)
    for seconds in (0.009, 0.05, 0.0101, 0.0):
        center.process_events(seconds)
    assert waits == [9, 50, 11, 0]


class _RecordingPoll:
    """Stands in for the kernel object under a driver; records the timeout it gets."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def poll(self, timeout: float, maxevents: int = -1) -> list[tuple[int, int]]:
        self.timeouts.append(timeout)
        return []

    def close(self) -> None:
        pass


@pytest.mark.parametrize("ms", [1, 9, 67, 1068, 30000])
def test_drivers_hand_the_kernel_exactly_the_milliseconds(ms: int) -> None:
    """CPython ceils seconds -> ns -> ms (epoll) or seconds*1e3 (PollSelector): a naive
    ``ms * 0.001`` would become ms + 1 for values such as 9 and 67."""
    import math
    import selectors

    from transport.event_driver import EpollDriver as _EpollDriver
    from transport.event_driver import SelectorsDriver as _SelectorsDriver

    ep = _EpollDriver(8)
    fake = _RecordingPoll()
    real, ep._ep = ep._ep, fake  # type: ignore[assignment]
    ep.poll(ms, 8)
    real.close()
    (t,) = fake.timeouts
    assert math.ceil(math.ceil(t * 1e9) / 1e6) == ms  # CPython's select.epoll.poll rounding
    sd = _SelectorsDriver(8)
    if isinstance(sd._sel, selectors.PollSelector):
        fake = _RecordingPoll()
        sd._sel._selector = fake  # type: ignore[attr-defined]
        sd.poll(ms, 8)
        assert fake.timeouts == [ms]  # PollSelector passed poll(2) this integer
    sd.close()


def test_producer_racing_into_the_wait_wakes_the_loop(center: EventCenter) -> None:
    """The other half of the handshake, made deterministic: a producer that runs after
    the loop published ``_sleeping`` and re-checked the queue (here: from inside the
    driver's poll, just before the kernel wait) must write the wake-up fd, so the wait
    ends at once instead of after the 5 s asked for."""
    real_poll = center._driver.poll
    ran: list[str] = []

    def racing_poll(timeout_ms: int, maxevents: int) -> list[tuple[int, int]]:
        if timeout_ms > 0 and not ran:
            assert center._sleeping
            center.dispatch_event_external(lambda: ran.append("late producer"))
        return real_poll(timeout_ms, maxevents)

    center._driver.poll = racing_poll  # type: ignore[method-assign]
    start = time.monotonic()
    assert center.process_events(5.0) == 1
    assert ran == ["late producer"]
    assert time.monotonic() - start < 2.5
