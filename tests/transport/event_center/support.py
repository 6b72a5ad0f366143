"""Helpers shared by the EventCenter tests."""

from __future__ import annotations

import time
from collections.abc import Callable

from transport.event_center import EventCenter

DRIVERS = ["epoll", "select", "asyncio", "uvloop"]


def pump(center: EventCenter, done: Callable[[], bool], limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, "condition not reached in time"
        center.process_events(0.05)


def record_waits(center: EventCenter) -> list[int]:
    """Spy on the center's driver: the list fills with the timeout (ms) of every poll."""
    waits: list[int] = []
    real_poll = center._driver.poll

    def spy(timeout_ms: int, maxevents: int) -> list[tuple[int, int]]:
        waits.append(timeout_ms)
        return real_poll(timeout_ms, maxevents)

    center._driver.poll = spy  # type: ignore[method-assign]
    return waits
