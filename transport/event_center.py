"""The per-worker event loop (Ceph's ``EventCenter``, ``Event.cc`` / ``EventEpoll.cc``).

One :class:`EventCenter` per worker process drives every socket, ring and timer of that
worker. One iteration (:meth:`EventCenter.process_events`) does, in order:

1. compute the wait: ``min(timeout, next timer)`` rounded *up* to the driver's
   resolution, or 0 when external events, ``call_soon`` callbacks or busy pollers are
   pending;
2. wait in the driver (:mod:`transport.event_driver`: epoll, or the ``selectors``
   fallback; :mod:`transport.asyncio_driver`: an asyncio or uvloop loop, where
   :meth:`EventCenter.serve` runs the center inside the running loop);
3. fired file events: the read callback, then the write callback of each fd;
4. due time events (earliest first);
5. external events and ``call_soon`` callbacks queued before this step began;
6. pollers, then loop hooks.

Facts this module relies on:

* The epoll facts (level-triggered mode, ERR/HUP, closed fds, millisecond rounding)
  are in :mod:`transport.event_driver`.
* **Sleep handshake** for external events (Seastar's, also Ceph's 0->1 pipe write): the
  loop sets ``_sleeping``, re-checks the external queue, then blocks. A producer appends
  first and reads ``_sleeping`` second, so either the loop's re-check sees the new item
  or the producer sees the flag and writes the eventfd. The GIL makes each of these
  steps atomic and sequentially consistent. The first producer that sees the flag
  clears it, so a burst of producers writes the eventfd once.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from .event_driver import DRIVERS, READABLE, WRITABLE, EventDriver, default_driver

if TYPE_CHECKING:
    from .asyncio_driver import AsyncioDriver

__all__ = ["READABLE", "WRITABLE", "CenterStatistics", "EventCenter", "EventDriver"]

logger = logging.getLogger("transport.event_center")

FileCallback = Callable[[int], None]
Callback = Callable[[], None]


@dataclass(frozen=True)
class CenterStatistics:
    """A snapshot of one center's counters (trio's ``statistics()`` convention)."""

    loops: int
    file_callbacks: int
    time_callbacks: int
    #: external events plus ``call_soon`` callbacks
    external_callbacks: int
    #: iterations that ran no callback and no poller did work (a high ratio to
    #: ``loops`` means the loop is spinning, cf. Ceph PR #53477)
    empty_wakeups: int
    #: time spent outside the driver wait, summed over iterations
    busy_seconds: float


class EventCenter:
    """File, time and external events for one thread (the owner).

    File and time events, ``call_soon``, pollers and hooks may only be used from the
    owner thread: the thread that created the center, or the one running :meth:`run`.
    :meth:`dispatch_event_external` and :meth:`stop` may be called from any thread.
    Callbacks that raise are logged on ``transport.event_center`` and the loop goes on.

    Unregister an fd (:meth:`delete_file_event`) before closing it. Build the center in
    the process that runs it: an epoll set survives ``fork`` shared with the parent
    (epoll(7), Q&A on fork), so a child must not reuse its parent's center.
    """

    #: With pollers registered the wait is 0; after this many consecutive iterations in
    #: which no poller did work and no callback ran, the loop waits up to
    #: ``POLLER_IDLE_WAIT`` instead (Ceph's RDMA ``ms_async_rdma_polling_us`` trade-off,
    #: notes §10.8): CPU drops to near zero when idle, at most one resolution of latency
    #: for work a poller would have found, none for work that also rings an fd. The
    #: default of the ``poller_idle_spins`` argument (one center may tune its own).
    POLLER_IDLE_SPINS = 1000
    POLLER_IDLE_WAIT = 0.001  # seconds
    #: While busy-polling, kernel fds (sockets, timerfds, wake-ups) are polled at most this
    #: often; with no pollers every iteration polls them.
    KERNEL_POLL_INTERVAL = 20e-6  # seconds

    def __init__(self, *, driver: str | EventDriver | None = None, nevent: int = 5000,
                 name: str = "", poller_idle_spins: int | None = None) -> None:
        if nevent < 1:
            raise ValueError("nevent must be >= 1")
        driver_obj = _make_driver(driver, nevent)
        self.name = name
        self.poller_idle_spins = (self.POLLER_IDLE_SPINS if poller_idle_spins is None
                                  else poller_idle_spins)
        self._driver = driver_obj
        # An asyncio driver waits in its loop and wakes it with call_soon_threadsafe; the
        # others block in the kernel and are woken through an eventfd in their set.
        # (an AsyncioDriver exists only once its module is imported: no asyncio import
        # for epoll centers.)
        aio_module = sys.modules.get("transport.asyncio_driver")
        self._aio: AsyncioDriver | None = (
            driver_obj if aio_module is not None and isinstance(driver_obj, aio_module.AsyncioDriver)
            else None)
        self.driver_name = self._aio.name if self._aio is not None else str(driver or default_driver())
        self._nevent = nevent
        self._rcb: dict[int, FileCallback] = {}
        self._wcb: dict[int, FileCallback] = {}
        self._mask: dict[int, int] = {}
        # Timers: heap of [when, id, callback-or-None]; deletion is lazy (callback=None).
        self._heap: list[list[object]] = []
        self._timers: dict[int, list[object]] = {}
        self._next_id = 1
        self._cancelled = 0
        self._external: deque[Callback] = deque()
        self._soon: list[Callback] = []
        self._pollers: dict[int, Callable[[], bool]] = {}
        # Snapshots iterated by the loop: no per-iteration copy, and add/remove from
        # inside a poller or hook cannot disturb the iteration in progress.
        self._poller_list: tuple[Callable[[], bool], ...] = ()
        self._hook_list: tuple[Callback, ...] = ()
        self._poll_idle = 0
        self._kernel_polled = 0.0
        self._hooks: dict[int, Callback] = {}
        self._sleeping = False
        self._stopping = False
        self._closed = False
        self._owner = threading.get_ident()
        self._wake_r = self._wake_w = -1
        # Wake-up fd: an eventfd (one fd, an 8-byte counter) or a pipe where none exists.
        try:
            if self._aio is not None:
                self._aio.attach(self.fire_file_event, self.fire_write_event)
                self._wake: Callback = self._aio.wake
            elif hasattr(os, "eventfd"):
                self._wake_r = self._wake_w = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            else:  # pragma: no cover - non-Linux
                self._wake_r, self._wake_w = os.pipe()
                os.set_blocking(self._wake_r, False)
                os.set_blocking(self._wake_w, False)
        except BaseException:
            driver_obj.close()  # EMFILE here must not leak the epoll fd
            raise
        if self._wake_r >= 0:
            self._wake = self._ring_wake_fd
            self._driver.add(self._wake_r, READABLE)
        self.loop_count = 0
        self._file_callbacks = 0
        self._time_callbacks = 0
        self._external_callbacks = 0
        self._empty_wakeups = 0
        self._busy = 0.0

    def __repr__(self) -> str:
        return (f"<EventCenter {self.name!r} {self.driver_name} fds={len(self._mask)} "
                f"timers={len(self._timers)}>")

    # -- file events -------------------------------------------------------------------

    def create_file_event(self, fd: int, mask: int, callback: FileCallback) -> None:
        """Call ``callback(fd)`` while ``fd`` is ready for ``mask`` (level-triggered).

        Read and write callbacks are separate; registering a direction again replaces
        its callback. The owner unregisters READABLE while it does not want to read.
        """
        if mask & ~(READABLE | WRITABLE) or not mask:
            raise ValueError(f"bad event mask {mask}")
        old = self._mask.get(fd, 0)
        if mask & READABLE:
            self._rcb[fd] = callback
        if mask & WRITABLE:
            self._wcb[fd] = callback
        new = old | mask
        if new != old:
            if old:
                self._driver.modify(fd, new)
            else:
                self._driver.add(fd, new)
                if len(self._mask) + 1 >= self._nevent:
                    # Ceph grows its table x4 when an fd passes nevent; here nevent is the
                    # epoll_wait batch size, grown so one wait can return every fd.
                    self._nevent *= 4
            self._mask[fd] = new

    def fire_file_event(self, fd: int) -> bool:
        """Run ``fd``'s READABLE callback now, from the owner thread; False when none is
        registered. User-space readiness for busy-polled stacks: a memif ring is memory,
        not a kernel object, so its poller reports "readable" without an eventfd write and
        an ``epoll_wait`` round trip (Ceph's DPDK stack does the same with its
        ``UserspaceEventManager``, src/msg/async/dpdk/UserspaceEvent.h)."""
        return self._fire(self._rcb.get(fd), fd)

    def fire_write_event(self, fd: int) -> bool:
        """Run ``fd``'s WRITABLE callback now, from the owner thread; False when none is
        registered (how an asyncio driver dispatches while its loop runs)."""
        return self._fire(self._wcb.get(fd), fd)

    def _fire(self, cb: Callable[[int], None] | None, fd: int) -> bool:
        if cb is None:
            return False
        self._file_callbacks += 1
        try:
            cb(fd)
        except Exception:  # noqa: BLE001 - logged; the loop must go on
            self._callback_failed(cb)
        return True

    def delete_file_event(self, fd: int, mask: int) -> None:
        """Stop watching ``fd`` for ``mask``; a no-op if not watched.

        Safe from inside any callback: a deleted callback is not called later in the
        same iteration.
        """
        old = self._mask.get(fd)
        if old is None:
            return
        if mask & READABLE:
            self._rcb.pop(fd, None)
        if mask & WRITABLE:
            self._wcb.pop(fd, None)
        new = old & ~mask
        if new == old:
            return
        if new:
            self._mask[fd] = new
            self._driver.modify(fd, new)
        else:
            del self._mask[fd]
            self._driver.remove(fd)

    # -- time events -------------------------------------------------------------------

    def create_time_event(self, delay: float, callback: Callback) -> int:
        """Run ``callback()`` once, ``delay`` seconds from now; returns an id."""
        eid = self._next_id
        self._next_id = eid + 1
        entry: list[object] = [time.monotonic() + max(delay, 0.0), eid, callback]
        self._timers[eid] = entry
        heapq.heappush(self._heap, entry)
        return eid

    def delete_time_event(self, event_id: int) -> None:
        """Cancel a time event; a no-op if it already ran or was deleted."""
        entry = self._timers.pop(event_id, None)
        if entry is None:
            return
        entry[2] = None
        self._cancelled += 1
        if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
            # Lazy deletion keeps delete O(1); compact when tombstones dominate.
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    # -- other event sources -----------------------------------------------------------

    def dispatch_event_external(self, callback: Callback) -> None:
        """Run ``callback()`` on the owner thread soon; callable from any thread."""
        self._external.append(callback)
        # Append first, read the flag second: see the sleep handshake in the module doc.
        if self._sleeping:
            self._sleeping = False  # later producers of this burst skip the syscall
            self._wake()

    def call_soon(self, callback: Callback) -> None:
        """Owner thread only: run ``callback()`` in the next iteration (no syscall)."""
        self._soon.append(callback)

    def add_poller(self, poll: Callable[[], bool]) -> int:
        """Call ``poll()`` every iteration; it returns True when it found work."""
        pid = self._next_id
        self._next_id = pid + 1
        self._pollers[pid] = poll
        self._poller_list = tuple(self._pollers.values())
        self._poll_idle = 0
        return pid

    def remove_poller(self, poller_id: int) -> None:
        self._pollers.pop(poller_id, None)
        self._poller_list = tuple(self._pollers.values())

    def add_loop_hook(self, callback: Callback) -> int:
        """Call ``callback()`` at the end of every iteration (the worker heartbeat)."""
        hid = self._next_id
        self._next_id = hid + 1
        self._hooks[hid] = callback
        self._hook_list = tuple(self._hooks.values())
        return hid

    def remove_loop_hook(self, hook_id: int) -> None:
        self._hooks.pop(hook_id, None)
        self._hook_list = tuple(self._hooks.values())

    # -- the loop ----------------------------------------------------------------------

    def process_events(self, timeout: float) -> int:
        """Run one iteration, waiting at most ``timeout`` seconds; returns callbacks run."""
        self.loop_count += 1
        monotonic = time.monotonic
        heap = self._heap
        wait_ms = 0
        if not (self._external or self._soon or (
                self._pollers and self._poll_idle < self.poller_idle_spins)):
            wait = timeout
            if self._pollers and wait > self.POLLER_IDLE_WAIT:
                wait = self.POLLER_IDLE_WAIT
            if heap:
                while heap and heap[0][2] is None:
                    heapq.heappop(heap)
                    self._cancelled -= 1
                if heap:
                    left: float = heap[0][0] - monotonic()  # type: ignore[operator]
                    wait = min(wait, left)
            if wait > 0.0:
                # Round UP to whole ms (Ceph PR #53477); the epsilon keeps 0.05 s from
                # becoming 51 ms through float error in the product.
                wait_ms = math.ceil(wait * 1000.0 - 1e-6)
                self._sleeping = True
                if self._external:  # re-check after publishing the flag
                    wait_ms = 0
        if wait_ms or not self._poller_list:
            events = self._driver.poll(wait_ms, self._nevent)
            woke = monotonic()
            self._kernel_polled = woke
        else:
            # Busy-polling: ask the kernel at most every KERNEL_POLL_INTERVAL. An
            # epoll_wait(0) costs about as much as a whole idle poller pass, and skipping
            # it between ring checks is what lets a poller see new frames sooner.
            woke = monotonic()
            if woke - self._kernel_polled >= self.KERNEL_POLL_INTERVAL:
                events = self._driver.poll(0, self._nevent)
                self._kernel_polled = woke
            else:
                events = []
        self._sleeping = False
        n = 0

        # File events: read callback, then write callback (skipped when it is the same
        # callable that just ran, as in Ceph).
        if events:
            rget = self._rcb.get
            wget = self._wcb.get
            rbits = self._driver.rbits
            wbits = self._driver.wbits
            wake_r = self._wake_r
            for fd, ev in events:
                if fd == wake_r:
                    self._drain_wake()
                    continue
                cb = None
                if ev & rbits:
                    cb = rget(fd)
                    if cb is not None:
                        n += 1
                        try:
                            cb(fd)
                        except Exception:  # noqa: BLE001 - logged; the loop must go on
                            self._callback_failed(cb)
                if ev & wbits:
                    wcb = wget(fd)
                    if wcb is not None and (cb is None or wcb != cb):
                        n += 1
                        try:
                            wcb(fd)
                        except Exception:  # noqa: BLE001 - logged; the loop must go on
                            self._callback_failed(wcb)
            self._file_callbacks += n

        # Due time events; entries created by these callbacks wait for a later pass.
        if heap and heap[0][0] <= woke:  # type: ignore[operator]
            timers = self._timers
            t = 0
            while heap and heap[0][0] <= woke:  # type: ignore[operator]
                _, eid, tcb = heapq.heappop(heap)
                if tcb is None:
                    self._cancelled -= 1
                    continue
                del timers[eid]  # type: ignore[arg-type]
                t += 1
                try:
                    tcb()  # type: ignore[operator]
                except Exception:  # noqa: BLE001 - logged; the loop must go on
                    self._callback_failed(tcb)
            self._time_callbacks += t
            n += t

        # External events queued before now (later ones wait, so a flood from another
        # thread cannot starve file events), then call_soon callbacks.
        ext = self._external
        if ext or self._soon:
            e = 0
            popleft = ext.popleft
            for _ in range(len(ext)):
                xcb = popleft()
                e += 1
                try:
                    xcb()
                except Exception:  # noqa: BLE001 - logged; the loop must go on
                    self._callback_failed(xcb)
            if self._soon:
                soon, self._soon = self._soon, []
                for scb in soon:
                    e += 1
                    try:
                        scb()
                    except Exception:  # noqa: BLE001 - logged; the loop must go on
                        self._callback_failed(scb)
            self._external_callbacks += e
            n += e

        if self._poller_list:
            worked = False
            for poll in self._poller_list:
                try:
                    if poll():
                        worked = True
                except Exception:  # noqa: BLE001 - logged; the loop must go on
                    self._callback_failed(poll)
            if worked or n:
                self._poll_idle = 0
                n += worked
            else:
                self._poll_idle += 1

        if self._hook_list:
            for hook in self._hook_list:
                try:
                    hook()
                except Exception:  # noqa: BLE001 - logged; the loop must go on
                    self._callback_failed(hook)

        if not n:
            self._empty_wakeups += 1
        self._busy += monotonic() - woke
        return n

    def _work_pending(self) -> bool:
        return bool(self._external or self._soon or (
            self._pollers and self._poll_idle < self.poller_idle_spins))

    async def serve(self, *, max_wait: float = 1.0) -> None:
        """Loop until :meth:`stop` inside the running loop of this center's
        :class:`~transport.asyncio_driver.AsyncioDriver` (await it from a task on that
        loop); other tasks of the loop run while the center waits. The awaiting thread
        becomes the owner."""
        aio = self._aio
        if aio is None:
            raise TypeError(f"serve() needs an AsyncioDriver; this center runs {self.driver_name}")
        self._owner = threading.get_ident()
        heap = self._heap
        try:
            while not self._stopping:
                # One pass; the driver notes the wait it computed instead of blocking, so
                # the epoll path's process_events stays exactly as it was.
                self.process_events(max_wait)
                wait_ms, aio.planned_wait_ms = aio.planned_wait_ms, 0  # 0 if it did not poll
                if wait_ms:
                    # That wait was computed before this pass's callbacks ran: redo the
                    # sleep handshake (process_events cleared the flag) and pass again at
                    # once if they queued work or an earlier timer.
                    self._sleeping = True
                    if self._work_pending() or (
                            heap and heap[0][0] <= time.monotonic() + wait_ms / 1000):  # type: ignore[operator]
                        wait_ms = 0
                await aio.wait(wait_ms)
                self._sleeping = False
        finally:
            self._stopping = False

    @property
    def driver(self) -> EventDriver:
        """The driver object (an :class:`~transport.asyncio_driver.AsyncioDriver` has the loop)."""
        return self._driver

    def run(self, *, max_wait: float = 1.0) -> None:
        """Loop until :meth:`stop`; the calling thread becomes the owner.

        ``max_wait`` bounds each wait so loop hooks run at least that often even when
        idle. A :meth:`stop` that came before ``run`` makes it return at once. On an
        asyncio driver: run its loop (not yet running) with :meth:`serve` until stop.
        """
        if self._aio is not None:
            if self._aio.loop.is_running():
                raise RuntimeError("run() inside the center's running loop: await serve() instead")
            self._aio.run(self.serve(max_wait=max_wait))
            return
        self._owner = threading.get_ident()
        try:
            while not self._stopping:
                self.process_events(max_wait)
        finally:
            self._stopping = False

    def stop(self) -> None:
        """Make :meth:`run` return after the current iteration; callable from any thread."""
        self._stopping = True
        if not self._closed:
            self._wake()

    @staticmethod
    def now() -> float:
        """The center's clock: :func:`time.monotonic`."""
        return time.monotonic()

    def in_thread(self) -> bool:
        """True on the owner thread."""
        return threading.get_ident() == self._owner

    def close(self) -> None:
        """Release the driver and the wake-up fd; idempotent. Call after :meth:`run`."""
        if self._closed:
            return
        self._closed = True
        self._driver.close()
        if self._wake_r >= 0:
            os.close(self._wake_r)
            if self._wake_w != self._wake_r:
                os.close(self._wake_w)
        self._rcb.clear()
        self._wcb.clear()
        self._mask.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> CenterStatistics:
        return CenterStatistics(
            loops=self.loop_count,
            file_callbacks=self._file_callbacks,
            time_callbacks=self._time_callbacks,
            external_callbacks=self._external_callbacks,
            empty_wakeups=self._empty_wakeups,
            busy_seconds=self._busy,
        )

    # -- internals ---------------------------------------------------------------------

    def _ring_wake_fd(self) -> None:
        try:
            if self._wake_w == self._wake_r:
                os.eventfd_write(self._wake_w, 1)
            else:  # pragma: no cover - pipe fallback
                os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # counter/pipe full: the loop is certain to wake anyway
        except OSError:
            if not self._closed:  # a stop() racing close() from another thread
                raise

    def _drain_wake(self) -> None:
        try:
            if self._wake_w == self._wake_r:
                os.eventfd_read(self._wake_r)
            else:  # pragma: no cover - pipe fallback
                while os.read(self._wake_r, 4096):
                    pass
        except BlockingIOError:
            pass

    def _callback_failed(self, cb: object) -> None:
        # Like asyncio's call_exception_handler: nobody can catch it, so log and go on.
        logger.exception("event center %r: callback %r raised", self.name, cb)


#: Driver names besides :data:`~transport.event_driver.DRIVERS`: a new loop of each kind,
#: owned (closed) by the center; ``msgr serve --loop`` takes these names.
LOOP_DRIVERS = ("asyncio", "uvloop")


def _make_driver(driver: str | EventDriver | None, nevent: int) -> EventDriver:
    if driver is not None and not isinstance(driver, str):
        return driver
    kind = driver or default_driver()
    if kind in LOOP_DRIVERS:
        import asyncio

        from .asyncio_driver import AsyncioDriver, new_uvloop
        loop = asyncio.new_event_loop() if kind == "asyncio" else new_uvloop()
        return AsyncioDriver(loop, own_loop=True)
    if kind not in DRIVERS:
        raise ValueError(f"unknown event driver {kind!r} (have {sorted([*DRIVERS, *LOOP_DRIVERS])})")
    return DRIVERS[kind](nevent)
