"""The supervisor's ring mesh: one SPSC ring per ordered pair of live workers.

The supervisor is the only process that
creates ring segments. Every ordered pair of live workers ``(src, dst)`` gets one SPSC ring
(:mod:`transport.shm.ring`) in its own memfd segment (``memfd_create(2)``: anonymous, so
nothing can be left in /dev/shm, even after SIGKILL — the kernel frees it with the last fd
and mapping; supervisors.md 1.5/ipc-facts) and two eventfd doorbells: ``bell`` (the
producer wakes the sleeping consumer) and ``space`` (the consumer wakes a producer that
found the ring full). Each ring is announced to both ends with a ``RING_ADD`` control
message (JSON descriptor; the memfd and the two eventfds by SCM_RIGHTS). Rings for a worker are made when it is
spawned, i.e. before it can become ACCEPTING. When a worker exits the supervisor sends
``RING_DEL`` to its peers: after a drain (``retire``) a peer first consumes what the
retired worker left in its ring, then closes; after a crash the supervisor first resets
the rings (epoch bump, :meth:`Ring.reset`) so any endpoint still using them gets
``BrokenResourceError``, and peers fail the requests in flight to that worker.

The worker's end (attach, send, serve) is :mod:`pool.worker.router`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from pool.control.messages import ControlMessage, RingAdd, RingDel
from pool.worker.config import DEFAULT_CAPACITY
from transport.shm import Doorbell, Ring, Segment

__all__ = ["RingMesh"]


@dataclass
class _ShmRing:
    src: int
    dst: int
    seg: Segment
    ring: Ring
    bell: Doorbell
    space: Doorbell


class RingMesh:
    """The supervisor's rings: creation, descriptors for workers, reset and unlink."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 4096 or capacity & (capacity - 1):
            raise ValueError(f"ring_capacity must be a power of two >= 4096, got {capacity}")
        self.capacity = capacity
        self.rings: dict[tuple[int, int], _ShmRing] = {}
        self._serial = 0

    def _create(self, src: int, dst: int) -> _ShmRing:
        self._serial += 1
        seg = Segment.create_memfd(Ring.required_size(self.capacity), f"r{src}x{dst}g{self._serial}")
        try:
            ring = Ring.create(seg.buf, self.capacity)
        except BaseException:
            seg.close()
            raise
        r = _ShmRing(src, dst, seg, ring, Doorbell(), Doorbell())
        self.rings[(src, dst)] = r
        return r

    def add_worker(self, slot: int, peers: list[int]) -> list[tuple[int, int]]:
        """Create the rings between ``slot`` and every peer, both directions (any old
        ring of the same pair is dropped first). Returns the new pairs."""
        made = []
        for p in peers:
            if p == slot:
                continue
            for pair in ((slot, p), (p, slot)):
                old = self.rings.pop(pair, None)
                if old is not None:
                    self._destroy(old, reset=True)
                self._create(*pair)
                made.append(pair)
        return made

    def descriptor(self, pair: tuple[int, int]) -> tuple[bytes, list[int]]:
        """The RING_ADD payload and fds (memfd, bell, space) for ``pair``; the fds stay ours."""
        r = self.rings[pair]
        payload = json.dumps({"src": r.src, "dst": r.dst, "size": r.seg.size,
                              "capacity": self.capacity}).encode()
        return payload, [r.seg.fd, r.bell.fileno(), r.space.fileno()]

    def connect_worker(self, slot: int, peers: list[int], send: Callable[[int, ControlMessage], None],
                       log: Callable[[str], None]) -> None:
        """Rings between a new worker and every other running one, announced to both
        ends with ``send(slot, RingAdd)``."""
        try:
            pairs = self.add_worker(slot, peers)
        except OSError as exc:  # out of memory/fds: the pool still serves, without rings
            log(f"slot {slot}: cannot create its rings ({exc}); submit_to to it will fail")
            return
        for pair in pairs:
            payload, fds = self.descriptor(pair)
            for end in pair:
                send(end, RingAdd(fds, payload))

    def disconnect_worker(self, slot: int, crashed: bool,
                          send: Callable[[int, ControlMessage], None]) -> None:
        """Drop ``slot``'s rings and tell its peers (``send(peer, RingDel)``)."""
        for peer in self.drop_worker(slot, crashed):
            send(peer, RingDel(slot, retired=not crashed))

    def pairs_of(self, slot: int) -> list[tuple[int, int]]:
        return sorted(p for p in self.rings if slot in p)

    def drop_worker(self, slot: int, crashed: bool) -> list[int]:
        """Retire every ring of ``slot``; reset them first after a crash. Returns the
        peers that must be told (RING_DEL)."""
        peers = set()
        for pair in self.pairs_of(slot):
            r = self.rings.pop(pair)
            peers.add(pair[0] if pair[1] == slot else pair[1])
            self._destroy(r, reset=crashed)
        return sorted(peers)

    @staticmethod
    def _destroy(r: _ShmRing, reset: bool) -> None:
        if reset:
            # Epoch bump: a peer still reading or writing this ring gets
            # BrokenResourceError instead of stale records; ringing both bells wakes it.
            r.ring.reset(r.bell, r.space)
        r.ring.close()
        r.seg.close()  # peers keep their own fds/mappings until they drop the ring
        r.bell.close()
        r.space.close()

    def close(self) -> None:
        for r in list(self.rings.values()):
            self._destroy(r, reset=False)
        self.rings.clear()
