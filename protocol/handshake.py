"""The handshake steps both roles share: HELLO, the end of auth, AUTH_SIGNATURE."""

from __future__ import annotations

from .auth import AuthResult, signature
from .control import MODE_SECURE, AuthRequest, AuthSignature, Hello
from .errors import RemoteProtocolError
from .exchange import Exchange
from .transitions import Role

__all__ = ["Handshake"]


class Handshake(Exchange):
    """Handlers of :data:`~protocol.transitions.TRANSITIONS` common to both roles."""

    def _on_hello(self, hello: Hello) -> None:
        self.peer_type = hello.entity_type
        self.learned_addr = hello.peer_addr
        if self.role is Role.CLIENT:
            assert self._client_auth is not None
            method, modes, payload = self._client_auth.request()
            self._send_control(AuthRequest(method, modes, payload))

    def _finish_auth(self, result: AuthResult) -> None:
        self.auth = result
        # Cut the transcript before secure mode takes the (ciphertext) rest of the buffer.
        rx = self.transcript.finish_received(self.decoder.buffered)
        if result.con_mode == MODE_SECURE:
            self._enable_secure(result.session_key)
        self._send_control(AuthSignature(signature(result.session_key, rx)))

    def _check_signature(self, sig: AuthSignature) -> None:
        """The peer's HMAC over what we sent before auth finished must match."""
        assert self.auth is not None
        expected = signature(self.auth.session_key, self.transcript.sent_bytes())
        if bytes(sig.sha256) != expected:
            raise RemoteProtocolError("AUTH_SIGNATURE mismatch: the pre-auth exchange was "
                                      "altered in transit", "auth_signature")
        self.transcript.stop()
