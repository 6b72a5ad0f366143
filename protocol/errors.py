"""Protocol error vocabulary (h11's split): who broke the rules decides who is at fault.

``LocalProtocolError`` means *we* were asked to do something illegal (a bug or a bad
argument on this side). ``RemoteProtocolError`` means the *peer* sent something illegal;
the caller faults the connection and the session policy decides what happens next.
``FrameError`` is the remote error for framing violations (crc, structure, size caps).
"""

from __future__ import annotations

__all__ = ["FrameError", "LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base of all protocol errors.

    ``reason`` is human text (what was wrong and what to do); ``code`` is a short
    machine-readable tag such as ``"bad_crc"``, ``"oversize"``, ``"bad_tag"``,
    ``"truncated"``, ``"bad_msgpack"``, ``"bad_payload"``.
    """

    def __init__(self, reason: str, code: str = "protocol") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, code={self.code!r})"


class LocalProtocolError(ProtocolError):
    """We were asked to do something illegal (encode an out-of-range field, misuse an API)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something illegal: fault the connection."""


class FrameError(RemoteProtocolError):
    """A frame violated crc, structure or size-cap rules."""
