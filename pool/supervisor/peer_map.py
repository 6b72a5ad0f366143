"""The versioned peer map the supervisor publishes to every worker (PEERS).

A new version goes out whenever the set of ACCEPTING workers changes or a worker was
lost (crashed, as opposed to drained) since the last one, so apps can tell "moved"
from "gone" (:class:`pool.worker.app.PeerMap`).
"""

from __future__ import annotations

from pool.control.messages import Peers

__all__ = ["PeerMapPublisher"]


class PeerMapPublisher:
    def __init__(self) -> None:
        self.version = 0
        self.slots: list[int] = []
        self._lost: set[int] = set()
        self._prev_slots: list[int] = []
        self._lost_sent: set[int] = set()

    def lost(self, slot: int) -> None:
        """``slot`` crashed: the next map must say so even if the ACCEPTING set is equal."""
        self._lost.add(slot)

    def message(self) -> Peers:
        """The current version (for a worker that starts after it was published)."""
        return Peers(self.version, tuple(self.slots), tuple(self._prev_slots),
                     tuple(sorted(self._lost_sent)))

    def update(self, accepting: list[int]) -> Peers | None:
        """A new version if ``accepting`` (sorted) differs or a worker was lost, else None."""
        if accepting == self.slots and not self._lost:
            return None
        self._prev_slots = self.slots
        self._lost_sent = set(self._lost)
        self._lost.clear()
        self.slots = accepting
        self.version += 1
        return self.message()
