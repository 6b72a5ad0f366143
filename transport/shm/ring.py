"""Single-producer single-consumer ring of variable-length records in shared memory.

Memory-ordering contract (read this before porting)
---------------------------------------------------
This ring is correct **only on x86-64**, whose TSO memory model never reorders a store
with an earlier store, nor a load with an earlier load. That is what makes the
unfenced protocol below safe from Python, where we cannot emit fences:

* the producer copies a record's bytes and writes its length, *then* stores ``tail``;
* the consumer loads ``tail``, *then* reads the record bytes and lengths below it;
* every shared counter is written with one aligned 8-byte store through
  ``memoryview.cast("Q")`` (``struct.pack_into`` zeroes and then copies, so a poller can
  see a transient 0 — a torn value).

Each of those steps is a separate C call made by the interpreter (``memcpy`` for a slice
assignment, one 8-byte store for a ``Q`` item), so the C compiler cannot reorder them
either. A producer killed at any instant has therefore at most written bytes above
``tail`` that no consumer will read: records appear whole or not at all.

On arm64/POWER/RISC-V the payload may become visible after ``tail`` and the consumer
would read garbage; no fenced implementation exists yet, so :class:`Ring` raises
``RuntimeError`` on any other architecture instead of corrupting data.

TSO does reorder a store with a *later load* (the store buffer). That matters only for
the two sleep handshakes (Dekker's pattern): "consumer stores sleeping=1, loads tail"
against "producer stores tail, loads sleeping", and the same for the producer's
"waiting for space" flag against the consumer's head store. The side about to sleep
calls ``membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)`` (``membarrier(2)``): it runs a full
barrier on every CPU currently running a registered process, so the hot side needs no
fence at all — the asymmetric scheme of Seastar's ``try_enter_interrupt_mode``. Where
membarrier is unavailable (old kernel, seccomp) ``EXACT_WAKEUP`` is False and blocking
waits must be capped (``Doorbell.wait``/EventCenter timeout); :meth:`RingConsumer.wait`
does that itself.

Layout
------
A header of ``HEADER_SIZE`` bytes, then ``capacity`` data bytes (a power of two). Hot
words live 128 bytes apart (own cache line, and own adjacent-line-prefetch pair on
Intel): word 0.. meta (magic, version, capacity, epoch); ``tail`` (producer-written);
``head`` (consumer-written); ``sleeping`` (consumer); ``space_wanted`` (producer sets,
consumer clears before ringing). ``head``/``tail`` are monotonic byte counters that never
wrap in practice (2**64 bytes). A record is an 8-byte length word plus the payload,
padded to 8 bytes; a record never straddles the end of the data area: if it does not
fit, the producer writes a WRAP marker and starts at offset 0 of the next lap, which is
why the largest record is ``capacity // 2 - 8`` bytes.

Crash recovery: the supervisor calls :meth:`Ring.reset`, which bumps ``epoch`` before
zeroing the counters; an endpoint compares the epoch it attached with before every store
of ``head``/``tail`` and after every load of ``tail``, and raises
:class:`~transport.errors.BrokenResourceError`. The surviving side then fails its
in-flight requests and attaches new endpoints. Reset a ring only once its writer is dead
or has been told: a producer that passed its epoch check just before the reset can still
store one stale ``tail``.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias

from ..errors import BrokenResourceError
from ..event_center import READABLE
from .doorbell import Doorbell

__all__ = ["EXACT_WAKEUP", "Bytes", "Ring", "RingConsumer", "RingPoller", "RingProducer"]

Bytes: TypeAlias = bytes | bytearray | memoryview

_MAGIC = 0x474E495252534D41  # b"AMSRRING" little-endian
_VERSION = 1
_LINE = 128
# Word indexes (8-byte words) in the header.
_W_MAGIC, _W_VERSION, _W_CAPACITY, _W_EPOCH = 0, 1, 2, 3
_W_TAIL = 1 * _LINE // 8
_W_HEAD = 2 * _LINE // 8
_W_SLEEP = 3 * _LINE // 8
_W_WANT = 4 * _LINE // 8
_HEADER = 5 * _LINE
_WRAP = (1 << 64) - 1
_MIN_CAPACITY = 256

_SUPPORTED_MACHINES = frozenset({"x86_64", "AMD64", "amd64"})


def _check_arch() -> None:
    machine = platform.machine()
    if machine not in _SUPPORTED_MACHINES:
        raise RuntimeError(
            f"transport.shm.Ring needs x86-64 (TSO) memory ordering; this machine is "
            f"{machine!r}, where stores/loads may be reordered and a consumer could see "
            f"tail before the record bytes. No fenced ring implementation is available."
        )


# --- membarrier(2) -----------------------------------------------------------------------

_SYS_MEMBARRIER = 324  # x86-64 syscall number (arch/x86/entry/syscalls/syscall_64.tbl)
_MB_QUERY, _MB_GLOBAL_EXPEDITED, _MB_REGISTER_GLOBAL_EXPEDITED = 0, 1 << 1, 1 << 2


def _load_membarrier() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_uint, ctypes.c_int]

    def call(cmd: int) -> int:
        return int(syscall(_SYS_MEMBARRIER, cmd, 0, 0))

    try:
        supported = call(_MB_QUERY)
    except OSError:
        return None
    need = _MB_GLOBAL_EXPEDITED | _MB_REGISTER_GLOBAL_EXPEDITED
    if supported < 0 or supported & need != need:
        return None
    return call


_membarrier_call = _load_membarrier() if platform.machine() in _SUPPORTED_MACHINES else None
#: True when the sleep handshakes are exact (membarrier available): a sleeper can block
#: without a timeout. False: a lost wake-up is possible, so cap every blocking wait.
EXACT_WAKEUP = _membarrier_call is not None
_registered_pid = -1


def _register_membarrier() -> None:
    """Register this process so other processes' membarriers fence its CPU too.

    Done per pid: a forked child has a new mm and must register itself.
    """
    global _registered_pid
    if (_membarrier_call is not None and _registered_pid != os.getpid()
            and _membarrier_call(_MB_REGISTER_GLOBAL_EXPEDITED) == 0):
        _registered_pid = os.getpid()


def _full_barrier() -> None:
    """Full memory barrier on this CPU and on every CPU running a registered process."""
    if _membarrier_call is not None:
        _membarrier_call(_MB_GLOBAL_EXPEDITED)


# --- the ring ------------------------------------------------------------------------------


class Ring:
    """The shared header + data area; endpoints are :class:`RingProducer`/:class:`RingConsumer`.

    Correct only on x86-64 (TSO): see the module docstring. Other architectures raise
    ``RuntimeError`` at ``create``/``attach`` because no fenced implementation exists.
    """

    HEADER_SIZE: int = _HEADER

    __slots__ = ("_data", "_data8", "_dq", "_hq", "_views", "capacity", "max_record")

    def __init__(self, buf: memoryview, capacity: int) -> None:
        _check_arch()
        self.capacity = capacity
        self.max_record = capacity // 2 - 8
        region = buf[: _HEADER + capacity]
        self._hq = region[:_HEADER].cast("B").cast("Q")
        self._data = region[_HEADER:].cast("B")
        # Payload view: record at offset ``off`` has its bytes at ``_data8[off:off+n]``
        # (one addition less per record in the hot loops).
        self._data8 = self._data[8:]
        self._dq = self._data.cast("Q")
        self._views = [region]

    @staticmethod
    def required_size(capacity: int) -> int:
        """Bytes of shared memory a ring of ``capacity`` data bytes needs."""
        Ring._check_capacity(capacity)
        return _HEADER + capacity

    @staticmethod
    def _check_capacity(capacity: int) -> None:
        if capacity < _MIN_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"ring capacity must be a power of two >= {_MIN_CAPACITY}, not {capacity}")

    @staticmethod
    def _check_buf(buf: memoryview, need: int) -> None:
        if buf.readonly or buf.itemsize != 1 or not buf.c_contiguous:
            raise ValueError("ring buffer must be a writable, contiguous byte memoryview")
        if buf.nbytes < need:
            raise ValueError(f"ring needs {need} bytes, buffer has {buf.nbytes}")

    @classmethod
    def create(cls, buf: memoryview, capacity: int) -> Ring:
        """Initialise a ring in ``buf`` (the owner does this once, before any attach)."""
        _check_arch()
        need = cls.required_size(capacity)
        cls._check_buf(buf, need)
        ring = cls(buf, capacity)
        hq = ring._hq
        for i in range(len(hq)):
            hq[i] = 0
        hq[_W_VERSION] = _VERSION
        hq[_W_CAPACITY] = capacity
        hq[_W_EPOCH] = 1
        # Magic last: an attacher that sees it sees a complete header (TSO store order).
        hq[_W_MAGIC] = _MAGIC
        return ring

    @classmethod
    def attach(cls, buf: memoryview) -> Ring:
        """Attach to a ring someone created in ``buf``; ValueError if it is not one."""
        _check_arch()
        cls._check_buf(buf, _HEADER)
        hq = buf[:_HEADER].cast("Q")
        try:
            magic, version, capacity = hq[_W_MAGIC], hq[_W_VERSION], hq[_W_CAPACITY]
        finally:
            hq.release()
        if magic != _MAGIC:
            raise ValueError(f"no ring here (magic {magic:#x}, expected {_MAGIC:#x})")
        if version != _VERSION:
            raise ValueError(f"ring version {version} is not supported (this code speaks {_VERSION})")
        cls._check_capacity(capacity)
        cls._check_buf(buf, _HEADER + capacity)
        return cls(buf, capacity)

    @property
    def epoch(self) -> int:
        return int(self._hq[_W_EPOCH])

    def used(self) -> int:
        """Bytes published and not yet released (a snapshot)."""
        return int(self._hq[_W_TAIL] - self._hq[_W_HEAD])

    def reset(self, *wake: Doorbell | None) -> int:
        """Crash recovery (supervisor): discard all records, bump the epoch, ring ``wake``.

        The epoch is stored first, so an endpoint that sees the zeroed counters also sees
        the new epoch (TSO) and raises BrokenResourceError. Returns the new epoch.
        """
        hq = self._hq
        epoch = int(hq[_W_EPOCH]) + 1
        hq[_W_EPOCH] = epoch
        hq[_W_TAIL] = 0
        hq[_W_HEAD] = 0
        hq[_W_SLEEP] = 0
        hq[_W_WANT] = 0
        for bell in wake:
            if bell is not None:
                bell.ring()
        return epoch

    def close(self) -> None:
        """Release this process's views of the shared memory (records drained and still
        held keep the mapping alive until dropped)."""
        self._dq.release()
        self._data8.release()
        self._data.release()
        self._hq.release()
        for v in self._views:
            v.release()


def _broken(ring: Ring, expected: int) -> BrokenResourceError:
    return BrokenResourceError(
        f"ring was reset by the supervisor (epoch {expected} -> {ring.epoch}); its peer crashed"
    )


class _RingEnd:
    """What both ends of a ring cache: its views and geometry (local attributes, not
    lookups through the Ring, on every record), the epoch they joined, the doorbells."""

    __slots__ = ("_bell", "_cap", "_data8", "_dq", "_epoch", "_hq", "_mask", "_max", "_ring",
                 "_space_bell")

    def __init__(self, ring: Ring, doorbell: Doorbell | None,
                 space_doorbell: Doorbell | None) -> None:
        _register_membarrier()
        self._ring = ring
        self._hq = ring._hq
        self._data8 = ring._data8
        self._dq = ring._dq
        self._cap = ring.capacity
        self._mask = ring.capacity - 1
        self._max = ring.max_record
        self._epoch = int(self._hq[_W_EPOCH])
        self._bell = doorbell
        self._space_bell = space_doorbell


class RingProducer(_RingEnd):
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
                raise _broken(self._ring, self._epoch)
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
        _full_barrier()
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


class RingConsumer(_RingEnd):
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
            raise _broken(self._ring, epoch)
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
            raise _broken(self._ring, epoch)
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
            raise _broken(self._ring, self._epoch)
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
        _full_barrier()
        if hq[_W_EPOCH] != self._epoch:
            hq[_W_SLEEP] = 0
            raise _broken(self._ring, self._epoch)
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
