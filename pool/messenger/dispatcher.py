"""What an application implements to receive messages and connection news.

Call order per connection (asyncio-style grammar):
``(ms_handle_connect | ms_handle_accept) -> ms_dispatch* -> [ms_handle_remote_reset ->
ms_dispatch*]* -> [ms_handle_reset]``. Every callback runs on the connection's worker
loop; keep them short or hand work elsewhere. ``ms_dispatch`` may keep the message past
its return by calling ``Messenger.hold(msg)``; the throttles stay charged until then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.message import Message

from .failure import HandshakeFailure

if TYPE_CHECKING:
    from .connection import AsyncConnection

__all__ = ["Dispatcher"]


class Dispatcher:
    """Base class with no-op callbacks; override what you need."""

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        """A message arrived, in order, exactly once per session."""

    def ms_handle_connect(self, conn: AsyncConnection) -> None:
        """An outgoing connection completed its handshake (also after a reconnect)."""

    def ms_handle_accept(self, conn: AsyncConnection) -> None:
        """An incoming connection completed its handshake as a new session."""

    def ms_handle_reset(self, conn: AsyncConnection) -> None:
        """The connection is gone for good (lossy fault, mark_down by the peer side,
        shutdown); messages still queued on it were dropped."""

    def ms_handle_remote_reset(self, conn: AsyncConnection) -> None:
        """The peer lost our session (restart, crash, reset): messages we sent that it had
        not acknowledged were dropped, and numbering starts afresh."""

    def ms_handle_refused(self, conn: AsyncConnection) -> None:
        """A connect attempt was refused (the connection keeps retrying if lossless)."""

    def ms_handle_error(self, conn: AsyncConnection, failure: HandshakeFailure) -> None:
        """The handshake failed for a reason retrying cannot cure (``failure.code`` is in
        ``failure.UNRETRYABLE``). A lossless session keeps its messages and retries only at the
        backoff maximum, in case the peer is reconfigured; call ``conn.mark_down()`` to
        give up instead. A lossy one is closed (``ms_handle_reset`` follows)."""
