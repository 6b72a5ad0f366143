"""An EventDriver over an asyncio event loop (the stdlib's or uvloop's).

File events are ``loop.add_reader``/``add_writer``, waits end through ``loop.call_later``
and wake-ups from other threads through ``loop.call_soon_threadsafe``: the EventCenter
keeps its own tables (callbacks, the timer heap, external and ``call_soon`` queues,
pollers, hooks) and asyncio does the waiting, so a program can ``await`` asyncio
libraries on the same loop that drives its connections.

Two ways to run, one driver:

* **Inside a running loop** (what a program and ``msgr serve --loop asyncio`` do):
  ``await center.serve()`` from a task on the driver's loop, or ``center.run()`` which
  runs that loop until :meth:`EventCenter.stop`. A file callback then runs directly from
  asyncio's ready handle, in the same batch as the readiness the loop just observed
  (collecting it for a later pass would hand callbacks readiness one ``select`` old:
  asyncio polls the kernel before it runs handles queued earlier). Each callback also
  ends the center's wait, so its time events, external events, ``call_soon`` callbacks,
  pollers and loop hooks run in the center's next pass.
* **Driven by** :meth:`EventCenter.process_events` while the loop is not running (the
  conformance tests, a program that pumps by hand): :meth:`AsyncioDriver.poll` runs the
  loop until a file is ready, a wake-up came or the timeout passed, and returns the
  collected readiness like ``epoll_wait``; the center dispatches it as for epoll.

Readiness is level-triggered under both loops (asyncio's selectors and libuv's
``uv_poll`` both re-report an fd that stays ready), which is the EventCenter contract.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .event_driver import READABLE, WRITABLE

__all__ = ["UVLOOP_MISSING", "AsyncioDriver", "new_uvloop", "require_uvloop"]

#: What a caller that asked for uvloop is told when it is not installed.
UVLOOP_MISSING = "--loop uvloop needs the uvloop package: pip install uvloop"


def require_uvloop() -> None:
    """ImportError with :data:`UVLOOP_MISSING` unless uvloop can be imported (a start-up check)."""
    try:
        import uvloop  # noqa: F401
    except ImportError as exc:
        raise ImportError(UVLOOP_MISSING) from exc


def new_uvloop() -> asyncio.AbstractEventLoop:
    """A new uvloop event loop; ImportError with :data:`UVLOOP_MISSING` without uvloop."""
    require_uvloop()
    import uvloop

    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class AsyncioDriver:
    """EventDriver on ``loop`` (default: the running loop). ``own_loop``: close it too."""

    rbits = READABLE
    wbits = WRITABLE

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, *,
                 own_loop: bool = False) -> None:
        self.loop = asyncio.get_running_loop() if loop is None else loop
        self._own_loop = own_loop
        self._mask: dict[int, int] = {}
        self._ready: dict[int, int] = {}
        self._collect = False  # inside poll(): record readiness for the center's pass
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        #: serve mode: the wait the center's last pass computed (poll does not block)
        self.planned_wait_ms = 0
        self._timer: asyncio.TimerHandle | None = None
        self._fire_read: Callable[[int], bool] = _unattached
        self._fire_write: Callable[[int], bool] = _unattached

    @property
    def name(self) -> str:
        return "uvloop" if type(self.loop).__module__.startswith("uvloop") else "asyncio"

    def attach(self, fire_read: Callable[[int], bool], fire_write: Callable[[int], bool]) -> None:
        """The center's dispatchers, called directly while the loop runs (serve mode)."""
        self._fire_read, self._fire_write = fire_read, fire_write

    # -- EventDriver -------------------------------------------------------------------

    def add(self, fd: int, mask: int) -> None:
        self.modify(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        old = self._mask.get(fd, 0)
        try:
            self._change(fd, old, mask)
        except OSError:
            # The fd number was closed without delete_file_event and reused: the loop's
            # selector still holds the old registration (epoll dropped it). Forget it
            # and register afresh, as EpollDriver does.
            self._forget(fd)
            self._change(fd, 0, mask)
        self._mask[fd] = mask

    def remove(self, fd: int) -> None:
        if self._mask.pop(fd, 0):
            self._forget(fd)
        self._ready.pop(fd, None)

    def poll(self, timeout_ms: int, maxevents: int) -> list[tuple[int, int]]:
        """Readiness since the last poll. While the loop runs (serve mode) callbacks were
        dispatched directly and this returns nothing; otherwise run the loop until a file
        is ready, :meth:`wake` or ``timeout_ms`` (0: one pass of the loop)."""
        loop = self.loop
        if loop.is_running():
            self.planned_wait_ms = timeout_ms  # serve() awaits it: see EventCenter.serve
            return []
        fut: asyncio.Future[None] = loop.create_future()
        self._waiter = fut
        self._collect = True
        if timeout_ms > 0:
            handle: asyncio.Handle = self._arm(timeout_ms)
        else:
            handle = loop.call_soon(self._resolve)  # one select(0) runs before it stops
        try:
            loop.run_until_complete(fut)
        finally:
            self._cancel_timer()
            handle.cancel()
            self._collect = False
            self._waiter = None
        ready, self._ready = self._ready, {}
        return list(ready.items())

    def wake(self) -> None:
        """End the current or next wait; callable from any thread."""
        try:
            self.loop.call_soon_threadsafe(self._resolve)
        except RuntimeError:
            pass  # the loop is closed: a stop() racing close(); nobody waits any more

    def close(self) -> None:
        for fd in list(self._mask):
            self.remove(fd)
        if self._own_loop and not self.loop.is_closed():
            self.loop.close()

    # -- serve mode --------------------------------------------------------------------

    async def wait(self, timeout_ms: int) -> None:
        """Yield to the loop until a file event, :meth:`wake` or ``timeout_ms`` (0: one pass)."""
        if timeout_ms <= 0:
            await asyncio.sleep(0)
            return
        loop = self.loop
        fut: asyncio.Future[None] = loop.create_future()
        self._waiter = fut
        self._arm(timeout_ms)
        try:
            await fut
        finally:
            self._cancel_timer()
            self._waiter = None

    def run(self, main: Coroutine[Any, Any, None]) -> None:
        """Run ``main`` (the center's ``serve()``) on this driver's loop until it returns."""
        self.loop.run_until_complete(main)

    # -- internals ---------------------------------------------------------------------

    def _arm(self, timeout_ms: int) -> asyncio.TimerHandle:
        self._deadline = time.monotonic() + timeout_ms / 1000
        self._timer = self.loop.call_later(timeout_ms / 1000, self._on_timer)
        return self._timer

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        # libuv measures timers from its cached loop time in whole ms, so uvloop may fire
        # a call_later up to a millisecond early; the center's waits must not end early
        # (a timer would look not yet due and the loop would spin to it).
        left = self._deadline - time.monotonic()
        if left > 0:
            self._timer = self.loop.call_later(math.ceil(left * 1000) / 1000, self._on_timer)
        else:
            self._resolve()

    def _change(self, fd: int, old: int, new: int) -> None:
        loop = self.loop
        if new & READABLE and not old & READABLE:
            loop.add_reader(fd, self._readable, fd)
        elif old & READABLE and not new & READABLE:
            loop.remove_reader(fd)
        if new & WRITABLE and not old & WRITABLE:
            loop.add_writer(fd, self._writable, fd)
        elif old & WRITABLE and not new & WRITABLE:
            loop.remove_writer(fd)

    def _forget(self, fd: int) -> None:
        for remove in (self.loop.remove_reader, self.loop.remove_writer):
            try:
                remove(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it (epoll(7) Q6)

    def _readable(self, fd: int) -> None:
        if self._collect:
            self._ready[fd] = self._ready.get(fd, 0) | READABLE
        else:
            self._fire_read(fd)
        self._resolve()

    def _writable(self, fd: int) -> None:
        if self._collect:
            self._ready[fd] = self._ready.get(fd, 0) | WRITABLE
        else:
            self._fire_write(fd)
        self._resolve()

    def _resolve(self) -> None:
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(None)


def _unattached(fd: int) -> bool:
    raise RuntimeError("AsyncioDriver used before EventCenter attached it")
