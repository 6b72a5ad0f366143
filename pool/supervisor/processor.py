"""The Processor: the supervisor's connection assignment (``processor`` accept mode).

In ``processor`` accept mode the supervisor accepts and gives each fd to
the ACCEPTING worker with the fewest live connections (control page count plus the
handoffs already in flight to it, Seastar's ``connection_distribution``); on NAK or death
the next one is tried. With no accepting worker the fd waits in a bounded backlog and
the accept loop pauses, so the kernel's listen queue, not our memory, holds the rest.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Processor"]

@dataclass
class _Delivery:
    fd: int
    meta: bytes
    tried: set[int]
    on_done: Callable[[int | None], None]


class Processor:
    """Assigns fds to workers: least loaded first, next one on NAK or death.

    ``candidates()`` returns ``{slot: live connection count}`` for ACCEPTING slots;
    ``send(slot, fd, meta, on_result)`` delivers over that slot's channel and later calls
    ``on_result(bool)``. The Processor owns each fd until a worker adopted it.
    """

    def __init__(self, candidates: Callable[[], dict[int, int]],
                 send: Callable[[int, int, bytes, Callable[[bool], None]], None],
                 log: Callable[[str], None], backlog_limit: int = 1024) -> None:
        self.candidates = candidates
        self._send = send
        self.log = log
        self.backlog_limit = backlog_limit
        self.inflight: dict[int, int] = {}
        self.backlog: deque[_Delivery] = deque()
        self.assigned = 0
        self.naks = 0
        self.dropped = 0

    def full(self) -> bool:
        return len(self.backlog) >= self.backlog_limit

    def submit(self, fd: int, meta: bytes = b"", exclude: Sequence[int] = (),
               on_done: Callable[[int | None], None] | None = None) -> None:
        """Give ``fd`` (owned by us from now on) to the least-loaded worker.

        ``on_done(slot)`` reports the adopter, or None when it had to be closed.
        """
        self._try(_Delivery(fd, meta, set(exclude), on_done or (lambda _s: None)))

    def _try(self, d: _Delivery) -> None:
        cands = self.candidates()
        load = {s: n + self.inflight.get(s, 0) for s, n in cands.items() if s not in d.tried}
        if not cands:
            if len(self.backlog) >= self.backlog_limit:
                self._drop(d, "backlog full")
                return
            d.tried.clear()
            self.backlog.append(d)
            return
        if not load:
            self._drop(d, "every accepting worker refused it")
            return
        slot = min(load, key=lambda s: (load[s], s))
        d.tried.add(slot)
        self.inflight[slot] = self.inflight.get(slot, 0) + 1

        def on_result(ok: bool, slot: int = slot, d: _Delivery = d) -> None:
            self.inflight[slot] -= 1
            if ok:
                self.assigned += 1
                os.close(d.fd)
                d.on_done(slot)
            else:
                self.naks += 1
                self._try(d)

        self._send(slot, d.fd, d.meta, on_result)

    def _drop(self, d: _Delivery, why: str) -> None:
        self.dropped += 1
        self.log(f"processor: closing a connection: {why}")
        os.close(d.fd)
        d.on_done(None)

    def kick(self) -> None:
        """Retry the backlog (a worker became ACCEPTING)."""
        if not self.candidates():
            return
        pending, self.backlog = self.backlog, deque()
        for d in pending:
            self._try(d)

    def close(self) -> None:
        for d in self.backlog:
            os.close(d.fd)
        self.backlog.clear()
