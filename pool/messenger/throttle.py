"""Receive throttles (Ceph's ``Throttle::get_or_fail``): never block, never buffer without
bound. A connection that cannot take a unit stops reading its socket (TCP backpressure
reaches the sender); the Messenger resumes it when the holder releases."""

from __future__ import annotations

from collections.abc import Callable

from protocol.message import Message
from transport.event_center import EventCenter

__all__ = ["ReceiveThrottle", "Throttle", "throttle_cost"]


class Throttle:
    """A counter with a limit (0 = unlimited) and wake-ups for those who were refused."""

    __slots__ = ("name", "limit", "current", "refused")

    def __init__(self, name: str, limit: int = 0) -> None:
        if limit < 0:
            raise ValueError(f"throttle {name}: limit must be >= 0, got {limit}")
        self.name = name
        self.limit = limit
        self.current = 0
        self.refused = 0

    def get_or_fail(self, n: int = 1) -> bool:
        """Take ``n`` units if they fit. A single request larger than the whole limit is
        admitted when nothing is held, so one oversized message cannot wedge a peer."""
        if self.limit and self.current + n > self.limit and self.current > 0:
            self.refused += 1
            return False
        self.current += n
        return True

    def put(self, n: int = 1) -> None:
        self.current -= n
        if self.current < 0:
            raise RuntimeError(f"throttle {self.name} released more than it held")


def throttle_cost(msg: Message) -> int:
    """What a received message charges the byte throttle: its data segment plus a fixed
    allowance for the header and front."""
    return len(msg.data) + 64


class ReceiveThrottle:
    """A Messenger's two receive throttles (messages, bytes) and the connections that
    were refused and wait for a release (each called once, FIFO, from the loop)."""

    def __init__(self, center: EventCenter, messages: int, nbytes: int) -> None:
        self.messages = Throttle("messages", messages)
        self.bytes = Throttle("bytes", nbytes)
        #: with no limits configured the per-message throttle work is skipped entirely
        self.enabled = bool(messages or nbytes)
        self._center = center
        self._waiters: dict[Callable[[], None], None] = {}
        self._resume_scheduled = False

    def take(self, size: int) -> bool:
        """One message of ``size`` bytes, or nothing (False) when either is full."""
        if not self.messages.get_or_fail(1):
            return False
        if not self.bytes.get_or_fail(size):
            self.messages.put(1)
            return False
        return True

    def put(self, size: int) -> None:
        self.bytes.put(size)
        self.messages.put(1)
        if self._waiters and not self._resume_scheduled:
            # Resume from the loop, not from inside whatever released (possibly a
            # dispatch callback): no re-entrant delivery.
            self._resume_scheduled = True
            self._center.call_soon(self._resume)

    def wait(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` (on the loop, FIFO, once) after the next release of either throttle."""
        self._waiters[cb] = None

    def cancel(self, cb: Callable[[], None]) -> None:
        self._waiters.pop(cb, None)

    def _resume(self) -> None:
        self._resume_scheduled = False
        waiters = self._waiters
        while waiters:
            cb = next(iter(waiters))
            del waiters[cb]
            cb()
            if cb in waiters:  # still refused: no capacity left, wait for the next put
                break
