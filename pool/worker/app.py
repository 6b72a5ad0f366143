"""The seam between the pool (processes, sockets, handoff) and what runs inside a worker.

A :class:`WorkerApp` is created inside the worker process by an :data:`AppFactory` and
is driven by the worker's EventCenter. The worker gives it a :class:`WorkerContext`.

Call grammar (the worker guarantees it)::

    factory() -> start(ctx) -> (adopt | connection_count | counters | handle_submit
                                | on_peer_map)*
              -> [begin_drain -> (counters | ...)* -> ctx.drained()] -> stop

``stop`` may come at any point after ``start`` (pool shutdown, supervisor gone).

Cross-worker requests (rings issue): ``ctx.submit_to(slot, payload, on_reply)`` sends
bytes to another worker over the shared-memory ring mesh (:mod:`pool.worker.router`); there the
app's ``handle_submit(src, payload, reply)`` answers with ``reply(bytes | Exception)``
and ``on_reply`` runs here, later, exactly once (bytes, or a
:class:`SubmitError`). ``on_peer_map`` tells the app the supervisor's current
set of ACCEPTING workers (a versioned map every worker sees in the same order).
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from transport.event_center import EventCenter
from transport.stack import ConnectedSocket

__all__ = ["AppFactory", "Overloaded", "PeerLost", "PeerMap", "PeerUnavailable", "RemoteError",
           "ReplyCallback", "SubmitError", "WorkerApp", "WorkerContext", "import_factory"]

#: the answer to a ``submit_to``: the peer's reply bytes or the reason there is none
ReplyCallback = Callable[[bytes | Exception], None]


class SubmitError(Exception):
    """A submitted request will not get a reply from the peer's app."""


class PeerUnavailable(SubmitError):
    """No ring to that worker (not running, or not announced yet)."""


class PeerLost(SubmitError):
    """The peer crashed or retired with this request in flight (it may or may not have
    been executed)."""


class Overloaded(SubmitError):
    """The per-destination in-flight limit and the local queue are both full."""


class RemoteError(SubmitError):
    """The peer's app answered with an error."""


@dataclass(frozen=True)
class PeerMap:
    """The supervisor's view of the ACCEPTING workers, versioned (monotonic per pool).

    ``prev`` is the previous version's slots; ``lost`` names workers that died (not
    drained) since then, so state they held is gone.
    """

    version: int = 0
    slots: tuple[int, ...] = ()
    prev: tuple[int, ...] = ()
    lost: tuple[int, ...] = ()


class WorkerContext(abc.ABC):
    """What a worker offers its app. Implemented by :mod:`pool.worker.process`."""

    slot: int
    center: EventCenter
    #: the pool's app configuration (``msgr serve --inject-socket-failures N`` lands here
    #: as ``{"inject_socket_failures": N}``, ``--app-config JSON`` is merged in)
    config: Mapping[str, Any]

    @abc.abstractmethod
    def handoff(self, target_slot: int, fd: int, meta: bytes, on_result: Callable[[bool], None]) -> None:
        """Send a live connection (kernel fd + opaque state, up to ~1 MiB) to another worker.

        ``on_result(True)`` once the target adopted it (the caller then closes its copy);
        ``on_result(False)`` on NAK, a dead or non-accepting target (try another slot).
        ``on_result`` always runs later on this worker's loop, never inside this call.
        """

    @abc.abstractmethod
    def accepting_slots(self) -> list[int]:
        """Slots currently ACCEPTING according to the control page (this one excluded)."""

    #: this worker's generation in its slot (bumped each time the slot is respawned)
    generation: int = 0

    def owner_of(self, slot: int, generation: int) -> int | None:
        """The ACCEPTING slot that now owns sessions created by ``slot`` in
        ``generation``: the slot itself while that generation still runs there, else the
        slot its sessions were migrated to (redirect table), else None (they died)."""
        return slot if generation == self.generation and slot == self.slot else None

    @abc.abstractmethod
    def drained(self) -> None:
        """The app owns nothing any more (after ``begin_drain``): the worker may exit."""

    def submit_to(self, slot: int, payload: bytes, on_reply: ReplyCallback) -> None:
        """Send ``payload`` to worker ``slot``'s ``handle_submit`` over the ring mesh.

        ``on_reply`` runs later on this loop, exactly once: the reply bytes, or an
        exception (:class:`PeerUnavailable`/``PeerLost``/``Overloaded``/
        ``RemoteError``). At most ``submit_inflight`` requests per destination are in
        flight; more wait in a bounded queue. Never blocks, never drops.
        """
        exc = PeerUnavailable("this worker has no ring mesh")
        self.center.call_soon(lambda: on_reply(exc))

    def peer_map(self) -> PeerMap:
        """The latest peer map the supervisor published."""
        return PeerMap()

    @abc.abstractmethod
    def log(self, msg: str) -> None:
        """One line to the pool's log, prefixed with this worker's slot and pid."""


class WorkerApp(abc.ABC):
    """What runs inside one worker process."""

    @abc.abstractmethod
    def start(self, ctx: WorkerContext) -> None:
        """Called once on the worker's loop, before READY is reported."""

    @abc.abstractmethod
    def adopt(self, conn: ConnectedSocket, meta: bytes) -> bool:
        """Take ownership of ``conn``. ``meta == b""``: freshly accepted; otherwise the
        state blob a draining worker passed to ``ctx.handoff``. False = NAK (the worker
        closes ``conn`` and the sender tries elsewhere)."""

    @abc.abstractmethod
    def connection_count(self) -> int:
        """Live connections owned now (the Processor balances on it)."""

    @abc.abstractmethod
    def counters(self) -> tuple[int, int, int, int]:
        """``(msgs_in, msgs_out, bytes_in, bytes_out)`` since start (monotonic)."""

    @abc.abstractmethod
    def begin_drain(self) -> None:
        """Stop taking work; migrate every connection with ``ctx.handoff``; call
        ``ctx.drained()`` when none remain."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Hard stop: close everything now."""

    def retention_counters(self) -> tuple[int, int, int]:
        """``(sessions_retained, retained_bytes, sessions_evicted)``: sessions kept for
        clients without a connection, what they hold, and how many the caps evicted.
        Apps without sessions keep none."""
        return (0, 0, 0)

    def throttle_counters(self) -> tuple[int, int, int]:
        """``(held_messages, held_bytes, refusals)`` of the receive throttles: what is
        dispatched and not yet released, and how often a connection stopped reading
        because a throttle was full. Apps without throttles hold none."""
        return (0, 0, 0)

    def handle_submit(self, src_slot: int, payload: bytes, reply: ReplyCallback) -> None:
        """A request another worker sent with ``submit_to``: call ``reply`` once, now or
        later, with the answer bytes or an exception (sent back as an error)."""
        reply(RuntimeError(f"{type(self).__name__} serves no submit_to requests"))

    def on_peer_map(self, peers: PeerMap) -> None:
        """The supervisor published a new peer map (see :class:`PeerMap`)."""


#: Must be picklable under spawn; with fork (the default) a closure works.
AppFactory = Callable[[], WorkerApp]


def import_factory(spec: str) -> AppFactory:
    """Resolve ``"package.module:Name"`` to the callable it names (a WorkerApp class or
    a factory function). Raises ValueError with the reason on a bad spec."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"app spec {spec!r} must look like MODULE:NAME (e.g. myapp.server:EchoApp)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {module_name!r} for --app {spec}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name} has no attribute {attr!r} (--app {spec})") from None
    if not callable(obj):
        raise ValueError(f"--app {spec} names {type(obj).__name__}, not a class or factory")
    factory: AppFactory = obj
    return factory
