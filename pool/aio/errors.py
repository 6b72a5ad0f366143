"""What an asyncio caller of asyncmsgr is told when a connection cannot do what it asked.

Every error names its reason: the session that was reset, the handshake check that
failed (issue 13's unretryable failures), the refusal, the timeout.
"""

from __future__ import annotations

__all__ = [
    "CallTimeout",
    "ConnectionClosed",
    "ConnectionRefused",
    "HandshakeError",
    "MessengerError",
    "SessionReset",
]


class MessengerError(Exception):
    """Base of every asyncmsgr error an awaiting caller sees."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SessionReset(MessengerError):
    """The session is gone: the peer reset it (it lost or refused our state) or a lossy
    connection faulted. Requests in flight may or may not have been processed."""


class ConnectionRefused(MessengerError):
    """The peer refused the connection (nothing listens, or it refused the session)."""


class HandshakeError(MessengerError):
    """A failure that retrying cannot fix: wrong identity, auth, features, not msgr2.

    ``kind`` is the machine-readable reason (``bad_ident``, ``auth``, ``features``,
    ``bad_banner``, ``msgr1``)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind


class ConnectionClosed(MessengerError):
    """The connection was closed locally (the ``async with`` block ended)."""


class CallTimeout(MessengerError, TimeoutError):
    """No reply within the call's timeout. The request stays in the session (lossless:
    it is still delivered once); its late reply is dropped."""
