"""The control page: one shared-memory segment per pool, one fixed-size slot per worker.

The supervisor alone creates and unlinks it (supervisors.md 2.7); workers attach by name.
Each slot is 24 unsigned 64-bit words (three cache lines). Ownership of words is split
so no word has two writers: the supervisor writes ``pid``, ``state``, ``restarts`` and
``generation``; the worker of that slot writes the heartbeat and its counters.

Facts this module relies on:

* **Single aligned stores.** ``struct.pack_into`` zeroes the target and then copies, so a
  concurrent reader can observe a transient 0 (notes/ipc-facts.md, "Traps"). Every word
  here is read and written through ``memoryview(mm).cast("Q")[i]``: one aligned 8-byte
  ``mov`` on x86-64, which is atomic for naturally aligned words (Intel SDM vol. 3A
  §9.1.1 "Guaranteed Atomic Operations"). mmap returns page-aligned memory, so word
  ``i`` is 8-byte aligned.
* **No ordering between words.** A reader may see a new heartbeat with an old loop
  counter; every consumer here treats each word on its own.
* **Pre-faulted.** ``posix_fallocate`` at creation makes a full /dev/shm fail with
  ENOSPC at start-up, not SIGBUS on first touch (supervisors.md 2.7).
* **Never the resource tracker.** posix_ipc does not register with multiprocessing's
  tracker, which could unlink a segment other processes still use (cpython gh-82300).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import posix_ipc

from transport import shmname

__all__ = ["FIELDS", "MAX_SLOTS", "RARE_INTERVAL_NS", "RETENTION_FIELDS", "RING_FIELDS", "THROTTLE_FIELDS",
           "ControlPage", "SlotView", "word_index"]

MAGIC = 0x616D7367_63746C31  # "amsgctl1"
VERSION = 2  # 2: 24-word slots (ring and throttle counters)
MAX_SLOTS = 64
HEADER_WORDS = 8
SLOT_WORDS = 24

#: word index of each slot field
FIELDS = {
    "pid": 0,
    "state": 1,
    "heartbeat_ns": 2,  # time.monotonic_ns() of the worker's last loop iteration
    "loop_count": 3,
    "connections": 4,
    "msgs_in": 5,
    "msgs_out": 6,
    "bytes_in": 7,
    "bytes_out": 8,
    "restarts": 9,
    "generation": 10,
    "handoffs_in": 11,
    "handoffs_out": 12,
    "sessions_retained": 13,  # server sessions kept without a connection (STANDBY)
    "retained_bytes": 14,     # what those sessions hold (unacknowledged and queued)
    "sessions_evicted": 15,   # sessions the retention caps made the worker forget
    # ring traffic between workers (the Router's counters), and the receive throttles;
    # refreshed every RARE_INTERVAL_NS, not every iteration (they feed metrics only)
    "ring_sent": 16,          # records (requests and replies) it wrote to rings
    "ring_served": 17,        # requests it served for peers
    "ring_replies": 18,       # replies it received
    "ring_failed": 19,        # its requests that failed (peer lost, overloaded, ...)
    "ring_backlogged": 20,    # records that waited for space in their ring first
    "throttle_held_msgs": 21,   # messages dispatched and not yet released
    "throttle_held_bytes": 22,  # their bytes
    "throttle_refusals": 23,    # times a connection stopped reading because a throttle was full
}
#: the fields that count sessions kept for clients without a connection (msgr perf)
RETENTION_FIELDS = ("sessions_retained", "retained_bytes", "sessions_evicted")
#: the Router's counters, in the order of their words
RING_FIELDS = ("ring_sent", "ring_served", "ring_replies", "ring_failed", "ring_backlogged")
#: what :meth:`pool.worker.app.WorkerApp.throttle_counters` returns, in order
THROTTLE_FIELDS = ("throttle_held_msgs", "throttle_held_bytes", "throttle_refusals")
#: the worker refreshes the RING_FIELDS and THROTTLE_FIELDS words at most this often
RARE_INTERVAL_NS = 250_000_000
# header words
_H_MAGIC, _H_VERSION, _H_NSLOTS, _H_OWNER = 0, 1, 2, 3


def word_index(slot: int, name: str) -> int:
    """Index of field ``name`` of ``slot`` in :meth:`ControlPage.words`."""
    return HEADER_WORDS + slot * SLOT_WORDS + FIELDS[name]


class SlotView:
    """Typed access to one slot's words (each read or write is one 8-byte access)."""

    __slots__ = ("_base", "_q", "index")

    def __init__(self, q: memoryview, index: int) -> None:
        self._q = q
        self.index = index
        self._base = HEADER_WORDS + index * SLOT_WORDS

    def get(self, name: str) -> int:
        return int(self._q[self._base + FIELDS[name]])

    def set(self, name: str, value: int) -> None:
        self._q[self._base + FIELDS[name]] = value

    def snapshot(self) -> dict[str, int]:
        """All fields, each read once (no cross-field consistency, see module doc)."""
        return {name: int(self._q[self._base + i]) for name, i in FIELDS.items()}

    def clear(self) -> None:
        """Zero every word (the supervisor, before reusing the slot)."""
        for i in range(SLOT_WORDS):
            self._q[self._base + i] = 0


class ControlPage:
    """A mapped control page. Create with :meth:`create`, attach with :meth:`attach`."""

    def __init__(self, name: str, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self._mm = mm
        self._q: memoryview | None = memoryview(mm).cast("Q")
        self.owner = owner
        self.nslots = int(self._q[_H_NSLOTS])

    @staticmethod
    def size_for(nslots: int) -> int:
        words = HEADER_WORDS + nslots * SLOT_WORDS + nslots  # + the redirect table
        return (words * 8 + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE

    @classmethod
    def create(cls, nslots: int = MAX_SLOTS, tag: str = "control") -> ControlPage:
        """Create (O_EXCL) and map a zeroed page; only the supervisor calls this."""
        if not 1 <= nslots <= MAX_SLOTS:
            raise ValueError(f"nslots must be 1..{MAX_SLOTS}, got {nslots}")
        name = shmname.segment_name(tag)
        size = cls.size_for(nslots)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
        try:
            os.posix_fallocate(shm.fd, 0, size)
            mm = mmap.mmap(shm.fd, size)
        except BaseException:
            shm.close_fd()
            shm.unlink()
            raise
        shm.close_fd()  # the mapping keeps the memory; no fd to leak into children
        page = cls.__new__(cls)
        q = memoryview(mm).cast("Q")
        q[_H_NSLOTS] = nslots
        q[_H_OWNER] = os.getpid()
        q[_H_VERSION] = VERSION
        q[_H_MAGIC] = MAGIC  # last: an attacher that sees the magic sees the rest
        q.release()
        ControlPage.__init__(page, name, mm, owner=True)
        return page

    @classmethod
    def attach(cls, name: str) -> ControlPage:
        """Map an existing page (a worker); raises if it is not a control page."""
        shm = posix_ipc.SharedMemory(name)
        try:
            mm = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        q = memoryview(mm).cast("Q")
        ok = q[_H_MAGIC] == MAGIC and q[_H_VERSION] == VERSION
        q.release()
        if not ok:
            mm.close()
            raise ValueError(f"{name} is not an asyncmsgr control page (version {VERSION})")
        return cls(name, mm, owner=False)

    def words(self) -> memoryview:
        """The page as 8-byte words (for hot paths that index FIELDS directly)."""
        return self._words()

    def _words(self) -> memoryview:
        if self._q is None:
            raise ValueError(f"control page {self.name} is closed")
        return self._q

    def slot(self, index: int) -> SlotView:
        if not 0 <= index < self.nslots:
            raise IndexError(f"slot {index} out of range 0..{self.nslots - 1}")
        return SlotView(self._words(), index)

    def slots(self) -> Iterator[SlotView]:
        for i in range(self.nslots):
            yield self.slot(i)

    @property
    def owner_pid(self) -> int:
        return int(self._words()[_H_OWNER])

    # -- redirect table: retired slot -> surviving slot, for session routing ----------

    def _redirect_index(self, slot: int) -> int:
        if not 0 <= slot < self.nslots:
            raise IndexError(f"slot {slot} out of range")
        return HEADER_WORDS + self.nslots * SLOT_WORDS + slot

    def set_redirect(self, retired: int, target: int | None) -> None:
        # Stored as target + 1 so that 0 (a fresh page) means "no redirect".
        self._words()[self._redirect_index(retired)] = 0 if target is None else target + 1

    def redirect(self, slot: int) -> int | None:
        v = int(self._words()[self._redirect_index(slot)])
        return None if v == 0 else v - 1

    def resolve(self, slot: int) -> int:
        """Follow redirects (bounded, so a cycle written by mistake cannot hang us)."""
        for _ in range(self.nslots):
            nxt = self.redirect(slot)
            if nxt is None or nxt == slot:
                return slot
            slot = nxt
        return slot

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        """Unmap (idempotent). Views must not be used afterwards."""
        if self._q is not None:
            self._q.release()
            self._q = None
            self._mm.close()

    def unlink(self) -> None:
        """Remove the name (the supervisor only); mappings stay valid until closed."""
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass
