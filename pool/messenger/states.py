"""The states of an AsyncConnection."""

from __future__ import annotations

import enum

__all__ = ["ConnState"]


class ConnState(enum.Enum):
    CONNECTING = "connecting"
    ACCEPTING = "accepting"
    HANDSHAKE = "handshake"
    READY = "ready"
    BACKOFF = "backoff"
    STANDBY = "standby"
    CLOSED = "closed"
