"""Drive a ring consumer from an EventCenter: spin while records come, then sleep on the doorbell."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..errors import BrokenResourceError
from ..event_center import READABLE
from .endpoints import RingConsumer

__all__ = ["RingPoller"]


class _Center(Protocol):
    """The part of :class:`transport.event_center.EventCenter` a RingPoller uses."""

    def create_file_event(self, fd: int, mask: int, callback: Callable[[int], None]) -> None: ...
    def delete_file_event(self, fd: int, mask: int) -> None: ...
    def add_poller(self, poll: Callable[[], bool]) -> int: ...
    def remove_poller(self, poller_id: int) -> None: ...


class RingPoller:
    """Drive a :class:`RingConsumer` from a worker's EventCenter with spin-then-block.

    A poller drains the ring every loop iteration; after ``spins`` empty polls it calls
    :meth:`RingConsumer.prepare_sleep` and, if that allows it, stops polling until the
    doorbell (registered READABLE) fires. ``on_records`` gets each batch of zero-copy
    views and must copy what it keeps: the views are released right after it returns.
    A ring reset is reported once to ``on_broken`` and the poller detaches itself.
    """

    __slots__ = (
        "_asleep",
        "_center",
        "_cons",
        "_fd",
        "_idle",
        "_on_broken",
        "_on_records",
        "_poller",
        "_spins",
    )

    def __init__(self, center: _Center, consumer: RingConsumer,
                 on_records: Callable[[list[memoryview]], None],
                 on_broken: Callable[[BrokenResourceError], None] | None = None,
                 spins: int = 64) -> None:
        fd = consumer.fileno()
        if fd is None:
            raise ValueError("RingPoller needs a RingConsumer built with a doorbell")
        self._center, self._cons = center, consumer
        self._on_records, self._on_broken = on_records, on_broken
        self._spins, self._idle, self._asleep = spins, 0, False
        self._fd: int | None = fd
        center.create_file_event(fd, READABLE, self._on_bell)
        self._poller: int | None = center.add_poller(self._poll)

    def _poll(self) -> bool:
        if self._asleep:
            return False  # blocked on the doorbell: the fd event wakes us
        cons = self._cons
        try:
            views = cons.drain()
            if views:
                self._idle = 0
                try:
                    self._on_records(views)
                finally:
                    cons.release()
                return True
            self._idle += 1
            if self._idle >= self._spins:
                self._idle = 0
                self._asleep = cons.prepare_sleep()
            return False
        except BrokenResourceError as e:
            self.close()
            if self._on_broken is None:
                raise
            self._on_broken(e)
            return True

    @property
    def asleep(self) -> bool:
        """True while the consumer has announced it sleeps on the doorbell."""
        return self._asleep

    def _on_bell(self, fd: int) -> None:
        self._cons.wake()
        self._asleep = False
        self._idle = 0
        self._poll()

    def close(self) -> None:
        """Stop watching the ring (the consumer and doorbell stay the caller's)."""
        if self._poller is not None:
            self._center.remove_poller(self._poller)
            self._poller = None
        if self._fd is not None:
            self._center.delete_file_event(self._fd, READABLE)
            self._fd = None
