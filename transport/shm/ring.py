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

from typing import TypeAlias

from ..errors import BrokenResourceError
from .doorbell import Doorbell
from .membarrier import EXACT_WAKEUP, check_arch, register_membarrier

__all__ = ["EXACT_WAKEUP", "Bytes", "Ring", "RingEnd", "ring_broken"]

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



class Ring:
    """The shared header + data area; endpoints are :class:`RingProducer`/:class:`RingConsumer`.

    Correct only on x86-64 (TSO): see the module docstring. Other architectures raise
    ``RuntimeError`` at ``create``/``attach`` because no fenced implementation exists.
    """

    HEADER_SIZE: int = _HEADER

    __slots__ = ("_data", "_data8", "_dq", "_hq", "_views", "capacity", "max_record")

    def __init__(self, buf: memoryview, capacity: int) -> None:
        check_arch()
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

    @classmethod
    def required_size(cls, capacity: int) -> int:
        """Bytes of shared memory a ring of ``capacity`` data bytes needs."""
        cls._check_capacity(capacity)
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
        check_arch()
        need = cls.required_size(capacity)
        cls._check_buf(buf, need)
        ring = cls(buf, capacity)
        hq = ring.views()[0]
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
        check_arch()
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

    def views(self) -> tuple[memoryview, memoryview, memoryview]:
        """(header words, payload bytes from offset 8, data words): what an end caches
        once so that its per-record loops index shared memory without a lookup."""
        return self._hq, self._data8, self._dq

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


def ring_broken(ring: Ring, expected: int) -> BrokenResourceError:
    return BrokenResourceError(
        f"ring was reset by the supervisor (epoch {expected} -> {ring.epoch}); its peer crashed"
    )


class RingEnd:
    """What both ends of a ring cache: its views and geometry (local attributes, not
    lookups through the Ring, on every record), the epoch they joined, the doorbells."""

    __slots__ = ("_bell", "_cap", "_data8", "_dq", "_epoch", "_hq", "_mask", "_max", "_ring",
                 "_space_bell")

    def __init__(self, ring: Ring, doorbell: Doorbell | None,
                 space_doorbell: Doorbell | None) -> None:
        register_membarrier()
        self._ring = ring
        self._hq, self._data8, self._dq = ring.views()
        self._cap = ring.capacity
        self._mask = ring.capacity - 1
        self._max = ring.max_record
        self._epoch = int(self._hq[_W_EPOCH])
        self._bell = doorbell
        self._space_bell = space_doorbell
