"""The seam between an AsyncConnection and the Messenger that owns it.

A connection needs from its owner exactly this: where it runs and how it is configured,
a way to dial and to start a client handshake, per-message delivery (throttle and
dispatch in one call), the throttle's wake-up, the session decisions a server makes
(ident, reconnect, retention), the dispatcher's connection callbacks, and counters.
Generic in the connection type, so neither module imports the other's.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable
from typing import Protocol, TypeVar

from protocol.connection import Connection, IdentRequest, ReconnectRequest
from protocol.message import Message
from protocol.session import Session
from transport.event_center import EventCenter
from transport.stack import Address, ConnectedSocket

from .config import MessengerConfig
from .failure import HandshakeFailure

__all__ = ["ConnectionOwner"]

ConnT = TypeVar("ConnT", contravariant=True)


class ConnectionOwner(Protocol[ConnT]):
    """What :class:`~pool.messenger.connection.AsyncConnection` calls on its Messenger."""

    center: EventCenter
    config: MessengerConfig
    rng: random.Random            # fault injection and back-off jitter
    stats: collections.Counter[str]
    msgs_out: int
    bytes_in: int
    bytes_out: int

    # -- dialling ----------------------------------------------------------------------
    def dial(self, addr: Address) -> ConnectedSocket:
        """A non-blocking connect to ``addr`` on the owner's stack (raises OSError)."""

    def client_wire(self, session: Session, addr: Address) -> Connection:
        """The client handshake for ``session``, dialled at ``addr``."""

    def count_socket_error(self, err: OSError) -> None: ...

    # -- messages ----------------------------------------------------------------------
    def deliver(self, conn: ConnT, msg: Message) -> bool:
        """Charge the throttles and dispatch ``msg``; False (nothing charged, nothing
        dispatched) when the throttles are full: call again after ``throttle_wait``."""

    def throttle_wait(self, cb: Callable[[], None]) -> None: ...

    def throttle_cancel(self, cb: Callable[[], None]) -> None: ...

    # -- the server's session decisions --------------------------------------------------
    def handle_ident(self, conn: ConnT, ev: IdentRequest) -> None: ...

    def handle_reconnect(self, conn: ConnT, ev: ReconnectRequest) -> None: ...

    def retain(self, conn: ConnT) -> None:
        """``conn`` (server side) lost its socket and keeps its session: account it."""

    def retain_more(self, conn: ConnT, msg: Message) -> None: ...

    def unregister(self, conn: ConnT) -> None:
        """``conn`` is closed: forget it."""

    # -- the dispatchers' connection callbacks ---------------------------------------------
    def dispatch_connect(self, conn: ConnT) -> None: ...

    def dispatch_reset(self, conn: ConnT) -> None: ...

    def dispatch_remote_reset(self, conn: ConnT) -> None: ...

    def dispatch_refused(self, conn: ConnT) -> None: ...

    def dispatch_error(self, conn: ConnT, failure: HandshakeFailure) -> None: ...
