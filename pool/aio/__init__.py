"""asyncmsgr from asyncio: a client (``connect``, ``send``, ``call``, ``async for``) and
async handlers for pool apps, on an EventCenter that the running loop drives."""

from .client import DEFAULT_MAX_INFLIGHT, AioConnection, connect
from .errors import (
    CallTimeout,
    ConnectionClosed,
    ConnectionRefused,
    HandshakeError,
    MessengerError,
    SessionReset,
)

__all__ = [
    "DEFAULT_MAX_INFLIGHT", "AioConnection", "CallTimeout", "ConnectionClosed",
    "ConnectionRefused", "HandshakeError", "MessengerError", "SessionReset", "connect",
]
