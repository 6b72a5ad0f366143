"""``--app MODULE:NAME`` naming an ``async def`` handler: an
:class:`~pool.aio.handlers.AsyncDispatcher` in a :class:`MessengerApp`.

It needs the worker's EventCenter to run inside an asyncio loop (``--loop asyncio`` or
``uvloop``): :func:`check_loop` refuses the app when the pool is configured otherwise
(``msgr serve`` exits with the reason before starting workers), and ``start`` checks the
center itself, so a worker never crash-loops on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pool.aio.handlers import DEFAULT_CONCURRENCY, AsyncDispatcher, Handler
from pool.worker.app import WorkerContext

from .messenger_app import MessengerApp

__all__ = ["ASYNC_LOOPS", "AsyncHandlerApp", "check_loop"]

#: the loops an async handler can run on
ASYNC_LOOPS = ("asyncio", "uvloop")
NEEDS_LOOP = "async handlers need --loop asyncio or uvloop"


def check_loop(loop: str, what: str) -> None:
    """ValueError unless ``loop`` can run async handlers."""
    if loop not in ASYNC_LOOPS:
        raise ValueError(f"{NEEDS_LOOP} (--app {what} is an async def handler; "
                         f"this pool runs --loop {loop})")


class AsyncHandlerApp(MessengerApp):
    """A MessengerApp whose dispatcher runs an async handler per message.

    App config: ``concurrency`` (handlers at once per connection, default 64)."""

    def __init__(self, handler: Handler, config: Mapping[str, Any] | None = None) -> None:
        cfg = dict(config or {})
        self.async_dispatcher = AsyncDispatcher(
            handler, concurrency=int(cfg.get("concurrency", DEFAULT_CONCURRENCY)))
        super().__init__(lambda: self.async_dispatcher, cfg)

    def start(self, ctx: WorkerContext) -> None:
        check_loop(ctx.center.driver_name, getattr(self.async_dispatcher.handler,
                                                   "__qualname__", "handler"))
        super().start(ctx)
        assert self.msgr is not None
        self.async_dispatcher.attach(self.msgr)
