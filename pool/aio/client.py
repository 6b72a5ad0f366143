"""The asyncio client: ``async with connect(...) as conn``, ``send``, ``call``, ``async for``.

One :class:`~pool.messenger.Messenger` on an EventCenter driven by the running asyncio
loop (:class:`transport.asyncio_driver.AsyncioDriver`), so the session machinery is the
one every worker runs: lossless reconnects, replay, throttles, handshake checks.

- ``await conn.send(msg)`` queues a message; it waits while more than ``max_inflight``
  messages are queued or unacknowledged (the session's own backpressure).
- ``await conn.call(msg, timeout=...)`` sends a request and returns the reply with the
  same ``tid`` (a fresh tid is set when the message has none). Replies may complete out
  of order; they are matched by tid. Cancelling a call, or its timeout, leaves the
  session consistent: the request stays queued (a lossless session still delivers it
  once) and its late reply is dropped and counted (``late_replies``).
- ``async for msg in conn`` yields the messages the server sends that answer no call.
- Session resets, refusals and unretryable handshake failures arrive as exceptions with
  their reasons (:mod:`pool.aio.errors`), in every waiting ``call``/``send`` and in the
  iterator.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Generator
from types import TracebackType
from typing import Any

from protocol.features import EntityType
from protocol.message import Message
from protocol.policy import Policy
from transport.addresses import parse_address
from transport.asyncio_driver import AsyncioDriver
from transport.event_center import EventCenter
from transport.stack import Address

from ..messenger.auth import AuthSettings
from ..messenger.config import MessengerConfig
from ..messenger.connection import AsyncConnection
from ..messenger.dispatcher import Dispatcher
from ..messenger.failure import HandshakeFailure
from ..messenger.messenger import Messenger
from .errors import (
    CallTimeout,
    ConnectionClosed,
    ConnectionRefused,
    HandshakeError,
    MessengerError,
    SessionReset,
)

__all__ = ["DEFAULT_MAX_INFLIGHT", "AioConnection", "connect"]

#: queued + unacknowledged messages above which ``send`` waits
DEFAULT_MAX_INFLIGHT = 1024


#: abandoned tids remembered for dropping their late replies (bounded: the oldest go)
_ABANDONED_MAX = 65536


class AioConnection(Dispatcher):
    """A client session to one server, used from asyncio. Make it with :func:`connect`.

    It is its own Messenger's dispatcher: the ``ms_*`` callbacks below run on the loop
    and turn the session's news into futures, a queue and exceptions."""

    def __init__(self, addr: Address, *, policy: Policy, entity_type: int,
                 auth: AuthSettings | None, max_inflight: int, ready_timeout: float,
                 identity: str | None) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.addr = addr
        self.max_inflight = max_inflight
        self.late_replies = 0
        self._loop = asyncio.get_running_loop()
        self._center = EventCenter(driver=AsyncioDriver(self._loop), name="aio-client")
        config = MessengerConfig(ready_timeout=ready_timeout, identity_check=identity)
        self._msgr = Messenger(self._center, config, entity_type=entity_type, policy=policy,
                               auth=auth)
        self._msgr.add_dispatcher(self)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._pushed: deque[Message] = deque()
        self._pushed_waiter: asyncio.Future[None] | None = None
        self._space_waiters: deque[asyncio.Future[None]] = deque()
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._failure: MessengerError | None = None
        self._tids = itertools.count(1)
        self._abandoned: dict[int, None] = {}  # insertion-ordered: a bounded FIFO set
        self._serve = self._loop.create_task(self._center.serve(), name="asyncmsgr-center")
        self._hook = self._center.add_loop_hook(self._wake_senders)
        self._conn = self._msgr.connect(addr)

    # -- the public API --------------------------------------------------------------------
    async def wait_ready(self, timeout: float | None) -> None:
        """Until the handshake completed (or raise why it did not)."""
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            raise CallTimeout(f"no session with {self.addr!r} within {timeout} s") from None

    async def send(self, msg: Message) -> None:
        """Queue ``msg`` (in order, per priority); waits while the session has more than
        ``max_inflight`` messages queued or unacknowledged."""
        self._check()
        while self._inflight() >= self.max_inflight:
            waiter = self._loop.create_future()
            self._space_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._space_waiters:
                    self._space_waiters.remove(waiter)
            self._check()
        self._conn.send_message(msg)

    async def call(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` and return the reply carrying its tid."""
        if msg.tid == 0:
            msg.tid = next(self._tids)
        elif msg.tid in self._pending:
            raise ValueError(f"a call with tid {msg.tid} is already waiting for its reply")
        fut: asyncio.Future[Message] = self._loop.create_future()
        self._pending[msg.tid] = fut
        sent = False
        try:
            await self.send(msg)
            sent = True
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise CallTimeout(f"no reply to tid {msg.tid} within {timeout} s; the request "
                              "stays in the session and its late reply is dropped") from None
        finally:
            if self._pending.pop(msg.tid, None) is not None and sent:
                self._abandon(msg.tid)  # cancelled or timed out: drop its reply later

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            while self._pushed:
                yield self._pushed.popleft()
            if isinstance(self._failure, ConnectionClosed):
                return  # closed locally: the iteration simply ends
            self._check()
            self._pushed_waiter = self._loop.create_future()
            try:
                await self._pushed_waiter
            finally:
                self._pushed_waiter = None

    async def close(self) -> None:
        """Close the session and stop the loop integration; idempotent."""
        if self._serve.done():
            return
        if self._failure is None or isinstance(self._failure, SessionReset):
            self._failure = ConnectionClosed("the connection was closed locally")
        self._fail_waiters()
        self._center.remove_loop_hook(self._hook)
        self._msgr.shutdown()
        self._center.stop()
        try:
            await self._serve
        finally:
            self._center.close()

    async def __aenter__(self) -> AioConnection:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    @property
    def messenger(self) -> Messenger:
        return self._msgr

    # -- the Messenger's callbacks (on the loop) ------------------------------------------
    def ms_handle_connect(self, conn: AsyncConnection) -> None:
        if not self._ready.done():
            self._ready.set_result(None)

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        tid = msg.tid
        fut = self._pending.pop(tid, None) if tid else None
        if fut is not None:
            if not fut.done():
                fut.set_result(msg)
            return
        if tid and tid in self._abandoned:
            del self._abandoned[tid]
            self.late_replies += 1
            return
        self._pushed.append(msg)
        w = self._pushed_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def ms_handle_reset(self, conn: AsyncConnection) -> None:
        self._fail(SessionReset("the connection faulted and its session was dropped "
                                "(a lossy policy, or marked down)"), final=True)

    def ms_handle_remote_reset(self, conn: AsyncConnection) -> None:
        # the server lost or refused our session; the connection goes on with a new one
        self._fail(SessionReset("the server reset the session (it restarted, or evicted "
                                "the session while we were away); requests in flight may "
                                "or may not have been processed"), final=False)

    def ms_handle_refused(self, conn: AsyncConnection) -> None:
        if not self._ready.done():  # once established, a lossless session keeps retrying
            self._fail(ConnectionRefused(f"{self.addr!r} refused the connection"), final=True)

    def ms_handle_error(self, conn: AsyncConnection, failure: HandshakeFailure) -> None:
        self._fail(HandshakeError(failure.code, failure.reason), final=True)

    # -- internals ----------------------------------------------------------------------
    def _abandon(self, tid: int) -> None:
        self._abandoned[tid] = None
        if len(self._abandoned) > _ABANDONED_MAX:
            del self._abandoned[next(iter(self._abandoned))]

    def _fail(self, err: MessengerError, final: bool) -> None:
        """Fail every waiting call (and, when ``final``, the connection itself)."""
        if final and self._failure is None:
            self._failure = err
        if not self._ready.done():
            self._ready.set_exception(err)
            self._ready.exception()  # marked retrieved: wait_ready re-raises it
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        self._fail_waiters(err)

    def _fail_waiters(self, err: MessengerError | None = None) -> None:
        for w in list(self._space_waiters):
            if not w.done():
                w.set_result(None)  # they re-check and raise self._failure
        pw = self._pushed_waiter
        if pw is not None and not pw.done():
            if err is not None and self._failure is None:
                pw.set_exception(err)
            else:
                pw.set_result(None)

    def _wake_senders(self) -> None:
        """A loop hook: after each pass (acks may have freed space), wake as many waiting
        senders as there is room for; each re-checks before it queues."""
        room = self.max_inflight - self._inflight() if self._space_waiters else 0
        while room > 0 and self._space_waiters:
            w = self._space_waiters.popleft()
            if not w.done():
                w.set_result(None)
                room -= 1

    def _inflight(self) -> int:
        s = self._conn.session
        return 0 if s is None else len(s.sent) + s.queued_count

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure


class _Connect:
    """What :func:`connect` returns: awaitable, and an async context manager."""

    def __init__(self, addr: Address, kwargs: dict[str, Any], timeout: float | None) -> None:
        self._addr, self._kwargs, self._timeout = addr, kwargs, timeout
        self._conn: AioConnection | None = None

    async def _open(self) -> AioConnection:
        conn = AioConnection(self._addr, **self._kwargs)
        try:
            await conn.wait_ready(self._timeout)
        except BaseException:
            await conn.close()
            raise
        return conn

    def __await__(self) -> Generator[Any, None, AioConnection]:
        return self._open().__await__()

    async def __aenter__(self) -> AioConnection:
        self._conn = await self._open()
        return self._conn

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._conn is not None
        await self._conn.close()


def connect(addr: str | Address, *, policy: Policy | None = None,
            entity_type: int = EntityType.CLIENT, auth: AuthSettings | None = None,
            max_inflight: int = DEFAULT_MAX_INFLIGHT, timeout: float | None = 10.0,
            identity: str | None = None) -> _Connect:
    """A ready client session to ``addr`` ("host:port", "[::1]:port", a Unix path):
    ``async with connect(addr) as conn:`` or ``conn = await connect(addr)`` (then
    ``await conn.close()``). ``timeout`` bounds the handshake; ``policy`` defaults to a
    lossless client; ``identity`` is the SERVER_IDENT check (``strict``/``record``)."""
    kwargs: dict[str, Any] = {
        "policy": policy or Policy.lossless_client(), "entity_type": entity_type,
        "auth": auth, "max_inflight": max_inflight,
        "ready_timeout": timeout if timeout is not None else 10.0, "identity": identity}
    return _Connect(parse_address(addr), kwargs, timeout)
