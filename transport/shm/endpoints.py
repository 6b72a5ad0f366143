"""The two ends of a :class:`~transport.shm.ring.Ring`: its one producer and its one consumer.

The protocol (record layout, tail/head stores, the sleep handshakes and their
``membarrier``) is described in :mod:`transport.shm.ring`; this module is its hot path:
every per-record loop works on locals copied from :class:`~transport.shm.ring.RingEnd`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import BrokenResourceError
from .doorbell import Doorbell
from .membarrier import EXACT_WAKEUP, full_barrier
from .ring import (
    _W_EPOCH,
    _W_HEAD,
    _W_SLEEP,
    _W_TAIL,
    _W_WANT,
    _WRAP,
    Bytes,
    Ring,
    RingEnd,
    ring_broken,
)

__all__ = ["RingConsumer", "RingProducer"]


class RingProducer(RingEnd):
    """The single writer of a ring.

    Backpressure: a refusal (``try_reserve``/``send`` returning None/False, ``send_many``
    returning fewer) never drops and never blocks. With a ``space_doorbell``, the
    producer sets ``space_wanted`` in the header; the consumer's next ``release`` that
    sees it clears it and rings that doorbell. The producer's EventCenter watches
    ``space_doorbell.fileno()`` READABLE and calls :meth:`handle_space_event`, which runs
    the ``on_space`` callback once per refusal::

        center.create_file_event(prod.space_fileno(), READABLE,
                                 lambda fd: prod.handle_space_event())
    """

    __slots__ = ("_limit", "_on_space", "_pub", "_res", "_res_n", "_tail", "_waiting")

    def __init__(self, ring: Ring, doorbell: Doorbell | None = None,
                 space_doorbell: Doorbell | None = None) -> None:
        super().__init__(ring, doorbell, space_doorbell)
        self._tail = int(self._hq[_W_TAIL])  # written locally, published by publish()
        self._pub = self._tail
        self._limit = int(self._hq[_W_HEAD]) + self._cap  # cached: tail may reach this
        self._res = -1
        self._res_n = 0
        self._on_space: Callable[[], None] | None = None
        self._waiting = False

    # -- zero-copy path ----------------------------------------------------------------

    def try_reserve(self, n: int) -> memoryview | None:
        """A writable view for one ``n``-byte record, or None when the ring is full."""
        if not 0 <= n <= self._max:
            raise ValueError(f"record of {n} bytes does not fit this ring (max {self._max})")
        size = (n + 15) & ~7
        t = self._tail
        off = t & self._mask
        skip = self._cap - off if off + size > self._cap else 0
        end = t + skip + size
        if end > self._limit:
            self._limit = self._hq[_W_HEAD] + self._cap
            if end > self._limit:
                self._refused(end)
                return None
        if skip:
            # Not visible until the next tail store; harmless if never committed.
            self._dq[off >> 3] = _WRAP
            t += skip
            self._tail = t
            off = 0
        self._res = t
        self._res_n = n
        return self._data8[off: off + n]

    def commit(self, n: int) -> None:
        """Finish the reserved record with its real length ``n`` (<= reserved); still
        invisible to the consumer until :meth:`publish`."""
        t = self._res
        if t < 0:
            raise RuntimeError("commit() without a successful try_reserve()")
        if not 0 <= n <= self._res_n:
            raise ValueError(f"commit({n}) exceeds the {self._res_n} bytes reserved")
        self._dq[(t & self._mask) >> 3] = n
        self._tail = t + ((n + 15) & ~7)
        self._res = -1

    def publish(self) -> None:
        """Make every committed record visible with ONE tail store; ring the consumer's
        doorbell only if it said it is sleeping."""
        t = self._tail
        if t != self._pub:
            hq = self._hq
            if hq[_W_EPOCH] != self._epoch:
                raise ring_broken(self._ring, self._epoch)
            hq[_W_TAIL] = t
            self._pub = t
            if hq[_W_SLEEP] and self._bell is not None:
                self._bell.ring()

    # -- copying path ------------------------------------------------------------------

    def send(self, data: Bytes) -> bool:
        """Copy one record in and publish it; False (nothing written) when full."""
        n = len(data)
        if n > self._max:
            raise ValueError(f"record of {n} bytes does not fit this ring (max {self._max})")
        size = (n + 15) & ~7
        t = self._tail
        cap = self._cap
        off = t & (cap - 1)
        skip = cap - off if off + size > cap else 0
        end = t + skip + size
        if end > self._limit:
            self._limit = self._hq[_W_HEAD] + cap
            if end > self._limit:
                self._refused(end)
                return False
        if skip:
            self._dq[off >> 3] = _WRAP
            off = 0
        self._dq[off >> 3] = n
        self._data8[off: off + n] = data
        self._tail = end
        self.publish()
        return True

    def send_many(self, records: Sequence[Bytes]) -> int:
        """Copy as many records as fit, in order, and publish them with one tail store.

        Returns how many were taken; fewer than ``len(records)`` means the ring is full
        (see the class docstring for how the producer learns that space freed up).
        """
        # Locals: attribute loads dominate a per-record loop in CPython.
        data8 = self._data8
        dq = self._dq
        cap = self._cap
        mask = cap - 1
        mx = self._max
        limit = self._limit
        t = self._tail
        count = 0
        for rec in records:
            n = len(rec)
            if n > mx:
                raise ValueError(f"record of {n} bytes does not fit this ring (max {mx})")
            size = (n + 15) & ~7
            off = t & mask
            if off + size > cap:
                end = t + cap - off + size
                if end > limit:
                    limit = self._hq[_W_HEAD] + cap
                    if end > limit:
                        self._refused(end)
                        break
                dq[off >> 3] = _WRAP
                off = 0
            else:
                end = t + size
                if end > limit:
                    limit = self._hq[_W_HEAD] + cap
                    if end > limit:
                        self._refused(end)
                        break
            dq[off >> 3] = n
            data8[off: off + n] = rec
            t = end
            count += 1
        self._limit = limit
        self._tail = t
        self.publish()
        return count

    # -- backpressure ------------------------------------------------------------------

    def free_space(self) -> int:
        """Bytes the consumer has released and we have not yet filled (a snapshot)."""
        self._limit = self._hq[_W_HEAD] + self._cap
        return int(self._limit - self._tail)

    def on_space(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (from :meth:`handle_space_event`) after each refusal, once the
        consumer has freed space. Needs a ``space_doorbell``."""
        if callback is not None and self._space_bell is None:
            raise ValueError("on_space needs a RingProducer built with a space_doorbell")
        self._on_space = callback

    def space_fileno(self) -> int | None:
        """The fd to register READABLE for space notifications (None without one)."""
        return None if self._space_bell is None else self._space_bell.fileno()

    def handle_space_event(self) -> None:
        """The space doorbell became readable: drain it and run the ``on_space`` callback."""
        if self._space_bell is not None:
            self._space_bell.drain()
        if self._waiting:
            self._waiting = False
            self._limit = self._hq[_W_HEAD] + self._cap
            cb = self._on_space
            if cb is not None:
                cb()

    def _refused(self, end: int) -> None:
        self._tail_publish_pending()
        bell = self._space_bell
        if bell is None or self._waiting:
            return
        self._waiting = True
        hq = self._hq
        hq[_W_WANT] = 1
        # Dekker with the consumer's "store head; load space_wanted": see module doc.
        full_barrier()
        self._limit = hq[_W_HEAD] + self._cap
        if end <= self._limit:
            # Space freed between our check and the flag: the consumer may not have seen
            # the flag, so ring our own bell; the callback then runs from the event loop
            # (never re-entrantly from inside send).
            bell.ring()

    def _tail_publish_pending(self) -> None:
        # Records committed before a refusal must reach the consumer, or a consumer that
        # waits for them could never free the space we are waiting for.
        if self._tail != self._pub:
            self.publish()

    def close(self) -> None:
        """Forget the ring (doorbells are owned by the caller)."""
        self._on_space = None


class RingConsumer(RingEnd):
    """The single reader of a ring.

    ``drain`` returns zero-copy memoryviews into shared memory; they stay valid until
    :meth:`release`, after which the producer may overwrite them. Wake-up protocol:
    :meth:`poll_spin` a bounded number of checks, then :meth:`prepare_sleep` (sets
    ``sleeping``, fences, re-checks) and, if it returned True, block on the doorbell's
    fd in the EventCenter; on wake-up call :meth:`wake`.
    """

    __slots__ = ("_drained", "_released")

    def __init__(self, ring: Ring, doorbell: Doorbell | None = None,
                 space_doorbell: Doorbell | None = None) -> None:
        super().__init__(ring, doorbell, space_doorbell)
        self._released = int(self._hq[_W_HEAD])
        self._drained = self._released

    def fileno(self) -> int | None:
        """The doorbell fd to register READABLE in the EventCenter (None without one)."""
        return None if self._bell is None else self._bell.fileno()

    def pending(self) -> bool:
        """True when published records wait beyond what was already drained."""
        return self._hq[_W_TAIL] != self._drained

    def drain(self, max_records: int = 1 << 30) -> list[memoryview]:
        """Every available record (up to ``max_records``) as zero-copy views, in order.

        Views stay valid until :meth:`release`. Raises BrokenResourceError after a reset.
        """
        hq = self._hq
        t = hq[_W_TAIL]
        h = self._drained
        epoch = self._epoch
        # Loaded after tail: a consumer that sees a reset tail also sees the new epoch.
        if hq[_W_EPOCH] != epoch:
            raise ring_broken(self._ring, epoch)
        if t == h:
            return []
        data8 = self._data8
        dq = self._dq
        mask = self._mask
        mx = self._max
        out: list[memoryview] = []
        append = out.append
        if max_records >= 1 << 30:
            # The common case, without a counter: per-record work is what bounds a
            # Python ring's throughput (ipc-facts.md), so this loop stays minimal.
            while h < t:
                off = h & mask
                n = dq[off >> 3]
                if n > mx:
                    if n == _WRAP:
                        h = (h | mask) + 1
                        continue
                    raise BrokenResourceError(f"corrupt ring record header {n:#x} at {h}")
                append(data8[off: off + n])
                h += (n + 15) & -8
        else:
            left = max_records
            while h < t and left:
                off = h & mask
                n = dq[off >> 3]
                if n > mx:
                    if n == _WRAP:
                        h = (h | mask) + 1
                        continue
                    raise BrokenResourceError(f"corrupt ring record header {n:#x} at {h}")
                append(data8[off: off + n])
                h += (n + 15) & -8
                left -= 1
        if hq[_W_EPOCH] != epoch:  # reset while we read: the views may be garbage
            raise ring_broken(self._ring, epoch)
        self._drained = h
        return out

    def release(self) -> None:
        """Give everything drained so far back to the producer (one head store).

        Rings the producer's space doorbell iff it flagged that it is waiting for space.
        """
        h = self._drained
        if h == self._released:
            return
        hq = self._hq
        if hq[_W_EPOCH] != self._epoch:
            raise ring_broken(self._ring, self._epoch)
        hq[_W_HEAD] = h
        self._released = h
        if hq[_W_WANT]:
            hq[_W_WANT] = 0
            if self._space_bell is not None:
                self._space_bell.ring()

    def poll_spin(self, spins: int) -> bool:
        """Check for new records up to ``spins`` times; True as soon as some arrived."""
        hq = self._hq
        d = self._drained
        for _ in range(spins):
            if hq[_W_TAIL] != d:
                return True
        return False

    def prepare_sleep(self) -> bool:
        """Set ``sleeping``, fence, re-check. True: nothing pending, safe to block on the
        doorbell. False: records arrived meanwhile (flag cleared again), keep going.
        Raises BrokenResourceError if the ring was reset."""
        hq = self._hq
        hq[_W_SLEEP] = 1
        # Dekker with the producer's "store tail; load sleeping": see module doc.
        full_barrier()
        if hq[_W_EPOCH] != self._epoch:
            hq[_W_SLEEP] = 0
            raise ring_broken(self._ring, self._epoch)
        if hq[_W_TAIL] != self._drained:
            hq[_W_SLEEP] = 0
            return False
        return True

    def wake(self) -> None:
        """Back from blocking: clear ``sleeping`` and reset the doorbell counter."""
        self._hq[_W_SLEEP] = 0
        if self._bell is not None:
            self._bell.drain()

    def wait(self, spins: int = 1000, timeout: float | None = None) -> bool:
        """Spin, then block on the doorbell (for code without an EventCenter).

        Returns True when records are pending. A ring reset wakes us and the next
        ``drain``/``release`` raises. Without exact wake-ups (``EXACT_WAKEUP`` False)
        each block is capped at 1 ms.
        """
        if self.poll_spin(spins):
            return True
        if self._bell is None:
            raise ValueError("wait() needs a RingConsumer built with a doorbell")
        if self.prepare_sleep():
            cap = timeout if EXACT_WAKEUP else (0.001 if timeout is None else min(timeout, 0.001))
            self._bell.wait(cap)
            self.wake()
        return self.pending() or self._hq[_W_EPOCH] != self._epoch

    def close(self) -> None:
        """Forget the ring (doorbells are owned by the caller)."""
        self._bell = None
        self._space_bell = None
