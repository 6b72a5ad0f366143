"""Bounds on what a server keeps for sessions that have no live connection.

A stateful server keeps a lossless client's session after its socket fails, so that the
client can resume it (STANDBY). A client that never returns — a crash loop, or anyone who
can reach the port — would otherwise make the server hold every such session and every
unacknowledged reply for the whole standby timeout. The caps here bound both, in the
spirit of mosquitto's ``max_queued_bytes`` / ``persistent_client_expiration`` and MQTT 5's
Session Expiry Interval:

* a count of retained sessions (per ledger, i.e. per worker);
* retained bytes per session: a session over it is evicted as soon as it is retained;
* retained bytes in total.

When a cap is exceeded the session idle longest (smallest ``idle_since``) goes first.
Eviction itself is the owner's job (it must tell the client, by a SESSION_RESET on its
reconnect): the ledger only says *which* sessions to evict. Sans-I/O: no clock, the
caller passes ``idle_since``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["DEFAULT_CAPS", "RetentionCaps", "RetentionLedger"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class RetentionCaps:
    """Limits on sessions without a connection; 0 disables a limit."""

    max_sessions: int = 1024
    max_session_bytes: int = 16 << 20
    max_total_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_session_bytes", "max_total_bytes"):
            v = getattr(self, name)
            if type(v) is not int or v < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 = no limit), got {v!r}")


#: Defaults for a worker. 1024 sessions: a worker serves a few thousand live clients at
#: most, and a real client that failed comes back within seconds, so a thousand absent
#: ones is already a crowd. 16 MiB per session: what a *live* session may legitimately
#: have unacknowledged when its socket fails — up to the messenger's output high-water
#: mark (4 MiB unsent) plus what was in flight in both socket buffers (several MiB on
#: loopback) — with room to spare; a smaller cap turns an ordinary socket fault of a
#: busy lossless client into a session reset (measured: 1 MiB reset 9 sessions of the
#: 256 KiB-payload synthetic workload in tests/pool/test_messenger.py). A session that
#: holds more is cheaper to reset than to keep. 64 MiB in total: four such sessions, or
#: the count cap times 64 KiB, small beside what the abandoned sessions cost before
#: (each pinned a 256 KiB receive buffer); the idle longest go first, so a session that
#: faulted a moment ago is the last to be evicted.
DEFAULT_CAPS = RetentionCaps()


class RetentionLedger(Generic[K]):
    """Which sessions are retained, their sizes, and which to evict.

    Entries are ordered by ``idle_since`` through a heap with lazy deletion (a session
    that resumes leaves a stale heap entry behind); the heap is rebuilt when stale
    entries outnumber live ones, so its size stays within twice the live count.
    """

    def __init__(self, caps: RetentionCaps = DEFAULT_CAPS) -> None:
        self.caps = caps
        self._entries: dict[K, tuple[int, int]] = {}   # key -> (bytes, heap ticket)
        self._heap: list[tuple[float, int, K]] = []
        self._tickets = itertools.count()
        self.total_bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def heap_entries(self) -> int:
        """Entries in the order heap, stale ones included (what the ledger itself costs)."""
        return len(self._heap)

    def retain(self, key: K, nbytes: int, idle_since: float) -> list[K]:
        """Record ``key`` as retained (again: its size is replaced) and return the keys
        to evict now, oldest idle first; ``key`` itself is among them when it alone is
        over the per-session cap. Returned keys are already out of the ledger and
        counted as evicted."""
        if nbytes < 0:
            raise ValueError(f"a session cannot retain {nbytes} bytes")
        self.release(key)
        caps = self.caps
        if caps.max_session_bytes and nbytes > caps.max_session_bytes:
            self.evicted += 1
            return [key]
        ticket = next(self._tickets)
        self._entries[key] = (nbytes, ticket)
        self.total_bytes += nbytes
        heapq.heappush(self._heap, (idle_since, ticket, key))
        return self._over_caps()

    def grow(self, key: K, nbytes: int) -> list[K]:
        """A retained session took on ``nbytes`` more (a reply queued while its client is
        away); returns the keys to evict, as :meth:`retain` does. No-op for a key that
        is not retained."""
        entry = self._entries.get(key)
        if entry is None:
            return []
        size = entry[0] + nbytes
        if self.caps.max_session_bytes and size > self.caps.max_session_bytes:
            self.release(key)
            self.evicted += 1
            return [key]
        self._entries[key] = (size, entry[1])
        self.total_bytes += nbytes
        return self._over_caps()

    def release(self, key: K) -> bool:
        """``key`` is no longer retained (resumed, closed, migrated away)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.total_bytes -= entry[0]
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._rebuild()
        return True

    def _rebuild(self) -> None:
        live = self._entries
        self._heap = [e for e in self._heap if live.get(e[2], (0, -1))[1] == e[1]]
        heapq.heapify(self._heap)

    def _over_caps(self) -> list[K]:
        caps = self.caps
        victims: list[K] = []
        while self._entries and (
                (caps.max_sessions and len(self._entries) > caps.max_sessions)
                or (caps.max_total_bytes and self.total_bytes > caps.max_total_bytes)):
            _idle, ticket, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is None or entry[1] != ticket:
                continue  # stale: that session left (or was re-retained) since
            del self._entries[key]
            self.total_bytes -= entry[0]
            self.evicted += 1
            victims.append(key)
        return victims
