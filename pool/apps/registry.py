"""Which app ``msgr serve --app SPEC`` runs: a built-in name or ``MODULE:NAME``.

Built-ins: ``echo`` (:class:`~pool.apps.echo.EchoDispatcher` in a MessengerApp) and
``kv`` (the sharded store, :mod:`pool.apps.kv`). ``MODULE:NAME`` names a
:class:`~pool.dispatcher.Dispatcher` subclass (run inside a
:class:`~pool.apps.messenger_app.MessengerApp`) or a :class:`~pool.worker.app.WorkerApp`
factory, or an ``async def handler(msg) -> Message | None``
(:mod:`pool.apps.async_app`). The registry imports the apps; no app imports the registry.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, cast

from pool.aio.handlers import Handler
from pool.api import Dispatcher
from pool.worker.app import AppFactory, WorkerApp, import_factory

from .async_app import AsyncHandlerApp, check_loop
from .echo import EchoDispatcher
from .kv import kv_app_factory
from .messenger_app import MessengerApp

__all__ = ["APPS", "load_app"]


def _echo_factory(cfg: Mapping[str, Any]) -> AppFactory:
    return functools.partial(MessengerApp, EchoDispatcher, dict(cfg))


#: built-in apps: name -> (app config -> factory); factories must be picklable under spawn
APPS: dict[str, Callable[[Mapping[str, Any]], AppFactory]] = {
    "echo": _echo_factory,
    "kv": kv_app_factory,
}


def _dispatcher_app(cls: Callable[[], Dispatcher], config: Mapping[str, Any]) -> WorkerApp:
    return MessengerApp(cls, config)


def load_app(spec: str, config: Mapping[str, Any] | None = None) -> AppFactory:
    """Resolve ``--app``: a built-in name or MODULE:NAME (a Dispatcher subclass, run in a
    MessengerApp, an ``async def`` handler, run by an AsyncDispatcher in a MessengerApp
    and refused unless ``config["loop"]`` is asyncio or uvloop, or a WorkerApp factory)."""
    cfg = dict(config or {})
    if spec in APPS:
        return APPS[spec](cfg)
    obj = import_factory(spec)
    if isinstance(obj, type) and issubclass(obj, Dispatcher):
        return functools.partial(_dispatcher_app, obj, cfg)
    if inspect.iscoroutinefunction(obj):
        check_loop(str(cfg.get("loop", "epoll")), spec)
        return functools.partial(AsyncHandlerApp, cast(Handler, obj), cfg)
    return cast(AppFactory, obj)
