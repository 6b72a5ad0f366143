"""Receive throttles (Ceph's ``Throttle::get_or_fail``): never block, never buffer without
bound. A connection that cannot take a unit stops reading its socket (TCP backpressure
reaches the sender); the Messenger resumes it when the holder releases."""

from __future__ import annotations

__all__ = ["Throttle"]


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
