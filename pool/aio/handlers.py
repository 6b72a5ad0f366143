"""Pool apps written as ``async def handler(msg: Message) -> Message | None``.

:class:`AsyncDispatcher` runs each received message's handler as a task on the worker's
running asyncio loop (``msgr serve --loop asyncio|uvloop``), so the handler can ``await``
any asyncio library. What it guarantees:

- **Ordering.** Handlers *start* in arrival order per session (dispatch order is the
  session's order). They run concurrently, so replies may complete out of order; each
  reply goes back on the request's connection with the request's ``tid``, and clients
  match replies by tid (``pool.aio`` ``call`` does). A handler returning None sends nothing.
- **Throttles.** Each message is kept with ``Messenger.hold`` until its handler is done,
  so the receive throttles (``--throttle-messages/-bytes``) stay charged meanwhile.
- **Concurrency limit** per connection (default :data:`DEFAULT_CONCURRENCY`). Beyond it
  the connection's reading is paused; messages already decoded wait in a queue (at most
  one socket read's worth) and start as slots free; reading resumes when the queue is
  empty again. Memory per connection stays bounded.
- **Errors.** A handler that raises is logged and counted (``handler_errors`` in the
  Messenger's stats); the connection and worker go on. The client gets *no* reply for
  that request (its ``call`` times out): an error reply would need a message type every
  app agrees on, and a reply that looks like success would be worse.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from protocol.message import Message

from ..messenger.connection import AsyncConnection
from ..messenger.dispatcher import Dispatcher

__all__ = ["DEFAULT_CONCURRENCY", "AsyncDispatcher", "Handler", "Holder"]

log = logging.getLogger("pool.aio.handlers")

#: handlers running at once per connection unless configured
DEFAULT_CONCURRENCY = 64

Handler = Callable[[Message], Awaitable[Message | None]]


class Holder(Protocol):
    """What the dispatcher needs of its Messenger: ``hold`` and the stats counter."""

    stats: collections.Counter[str]

    def hold(self, msg: Message) -> Callable[[], None]: ...


class _ConnSlots:
    """One connection's running handlers and the messages waiting for a slot."""

    __slots__ = ("paused", "running", "waiting")

    def __init__(self) -> None:
        self.running = 0
        self.waiting: deque[tuple[Message, Callable[[], None]]] = deque()
        self.paused = False


class AsyncDispatcher(Dispatcher):
    """Run ``handler`` for every message as a task; reply with its result (see module doc).

    ``attach(msgr)`` before the first message (the app does it once the Messenger exists).
    """

    def __init__(self, handler: Handler, *, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.handler = handler
        self.concurrency = concurrency
        self.handler_errors = 0
        self.peak_running = 0
        self._msgr: Holder | None = None
        self._slots: dict[AsyncConnection, _ConnSlots] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, msgr: Holder) -> None:
        self._msgr = msgr

    # -- Dispatcher ------------------------------------------------------------------------
    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        if self._msgr is None:
            raise RuntimeError("AsyncDispatcher.attach(messenger) was not called")
        release = self._msgr.hold(msg)
        slots = self._slots.get(conn)
        if slots is None:
            slots = self._slots[conn] = _ConnSlots()
        if slots.running >= self.concurrency or slots.waiting:
            # Full: keep arrival order, and stop reading this peer until a slot frees.
            slots.waiting.append((msg, release))
            # This pause is the connection's own reason: a throttle or write-backpressure
            # release does not end it; what was read already still arrives, and waits.
            slots.paused = True
            conn.pause_reading()
            return
        self._start(conn, slots, msg, release)

    def ms_handle_reset(self, conn: AsyncConnection) -> None:
        slots = self._slots.pop(conn, None)
        if slots is not None:
            for _msg, release in slots.waiting:
                release()  # never started: give the throttles back
            slots.waiting.clear()

    # -- running handlers ----------------------------------------------------------------------
    def _start(self, conn: AsyncConnection, slots: _ConnSlots, msg: Message,
               release: Callable[[], None]) -> None:
        slots.running += 1
        self.peak_running = max(self.peak_running, slots.running)
        task = asyncio.get_running_loop().create_task(self._run(conn, slots, msg, release))
        self._tasks.add(task)  # a strong reference until done (asyncio keeps only weak ones)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: AsyncConnection, slots: _ConnSlots, msg: Message,
                   release: Callable[[], None]) -> None:
        try:
            reply = await self.handler(msg)
        except Exception:  # noqa: BLE001 - a handler bug faults that request only
            self._count_error()
            log.exception("async handler raised on %r", msg)
            reply = None
        finally:
            release()
        try:
            if reply is not None:
                reply.tid = msg.tid
                conn.send_message(reply)
        except Exception:  # noqa: BLE001 - e.g. a reply that cannot be encoded
            self._count_error()
            log.exception("cannot send the reply to %r", msg)
        finally:
            slots.running -= 1
            self._next(conn, slots)

    def _count_error(self) -> None:
        self.handler_errors += 1
        if self._msgr is not None:
            self._msgr.stats["handler_errors"] += 1

    def _next(self, conn: AsyncConnection, slots: _ConnSlots) -> None:
        while slots.waiting and slots.running < self.concurrency:
            msg, release = slots.waiting.popleft()
            self._start(conn, slots, msg, release)
        if slots.paused and not slots.waiting:
            slots.paused = False
            conn.resume_reading()

    def running(self) -> int:
        """Handlers running now, over all connections."""
        return sum(s.running for s in self._slots.values())
