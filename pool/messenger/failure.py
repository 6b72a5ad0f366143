"""Handshake failures that retrying cannot cure, as the dispatcher hears of them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HandshakeFailure", "UNRETRYABLE"]

#: protocol error codes that the same attempt, retried, cannot cure: the server names
#: another identity, refuses our auth, lacks or requires features, or is no msgr2 peer
UNRETRYABLE = frozenset({"bad_ident", "auth", "features", "bad_banner", "msgr1"})


@dataclass(frozen=True, slots=True)
class HandshakeFailure:
    """Why an outgoing handshake failed in a way retrying will not fix."""

    code: str        # the protocol error code, e.g. "bad_ident", "auth", "features"
    reason: str      # what was wrong and what to do, in words
    retry_in: float  # seconds until the next attempt; 0 when the session is given up
