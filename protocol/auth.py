"""Authentication seam of the handshake (AUTH_REQUEST ... AUTH_DONE, AUTH_SIGNATURE).

Only method ``none`` lives here for now; the shared-secret method and secure mode plug in
through the same two classes. An authenticator sees the auth frames' payloads and, once
done, yields a session key. AUTH_SIGNATURE is HMAC-SHA256 keyed by that key over every
byte this side *received* before auth completed; the peer checks it against what it
*sent*, which binds the plaintext banner, hello and auth exchange (msgr2; notes §3.2).
With no key (method none) the signature is 32 zero bytes.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from .control import AUTH_NONE, MODE_CRC
from .errors import RemoteProtocolError

__all__ = ["AuthResult", "ClientAuth", "ServerAuth", "NoneClientAuth", "NoneServerAuth",
           "signature", "ZERO_SIGNATURE"]

ZERO_SIGNATURE = bytes(32)


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Outcome of a finished auth exchange."""

    global_id: int
    con_mode: int
    session_key: bytes | None


def signature(key: bytes | None, transcript: bytes) -> bytes:
    """AUTH_SIGNATURE payload for a transcript (zeros without a key)."""
    if not key:
        return ZERO_SIGNATURE
    return hmac.new(key, transcript, hashlib.sha256).digest()


class ClientAuth:
    """Client side of an auth method."""

    method: int = AUTH_NONE
    wants_transcript: bool = False

    def request(self) -> tuple[int, tuple[int, ...], bytes]:
        """(method, preferred modes, payload) for AUTH_REQUEST."""
        raise NotImplementedError

    def more(self, payload: bytes) -> bytes:
        """Answer to AUTH_REPLY_MORE."""
        raise RemoteProtocolError("server asked for more auth data; method has no rounds",
                                  "auth")

    def done(self, global_id: int, con_mode: int, payload: bytes) -> AuthResult:
        raise NotImplementedError


class ServerAuth:
    """Server side of an auth method."""

    wants_transcript: bool = False

    def handle_request(self, method: int, modes: tuple[int, ...], payload: bytes
                       ) -> tuple[str, object]:
        """Return ("done", AuthResult) | ("more", bytes) | ("bad", reason)."""
        raise NotImplementedError

    def handle_more(self, payload: bytes) -> tuple[str, object]:
        return ("bad", "unexpected AUTH_REQUEST_MORE")


class NoneClientAuth(ClientAuth):
    """Method none: no credentials, crc mode."""

    def request(self) -> tuple[int, tuple[int, ...], bytes]:
        return (AUTH_NONE, (MODE_CRC,), b"")

    def done(self, global_id: int, con_mode: int, payload: bytes) -> AuthResult:
        if con_mode != MODE_CRC:
            raise RemoteProtocolError(f"server chose connection mode {con_mode}, "
                                      "but auth none only supports crc mode", "auth")
        return AuthResult(global_id, con_mode, None)


class NoneServerAuth(ServerAuth):
    """Method none: accept anyone in crc mode."""

    def __init__(self) -> None:
        self._next_id = 0

    def handle_request(self, method: int, modes: tuple[int, ...], payload: bytes
                       ) -> tuple[str, object]:
        if method != AUTH_NONE:
            return ("bad", f"auth method {method} not allowed; this server allows none")
        if MODE_CRC not in modes:
            return ("bad", "client does not offer crc mode")
        self._next_id += 1
        return ("done", AuthResult(self._next_id, MODE_CRC, None))
