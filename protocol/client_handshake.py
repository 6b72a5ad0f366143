"""The client's half of the msgr2 handshake: auth replies, CLIENT_IDENT or
SESSION_RECONNECT, and the server's answers (SERVER_IDENT, RECONNECT_OK, RESET, RETRY*,
WAIT, IDENT_MISSING_FEATURES)."""

from __future__ import annotations

from .control import (
    IDENT_FLAG_LOSSY, AuthBadMethod, AuthDone, AuthReplyMore, AuthRequestMore, AuthSignature,
    ClientIdent, EntityAddr, IdentMissingFeatures, ServerIdent, SessionReconnect,
    SessionReconnectOk, SessionReset, SessionRetry, SessionRetryGlobal, Wait,
)
from .errors import RemoteProtocolError
from .events import Ready, ResetReceived, RetryReceived, WaitReceived
from .handshake import Handshake
from .identity import IdentityCheck, mismatch_reason, names_dialled
from .replies import auth_bad_method_text, missing_features_text
from .transitions import Outcome

__all__ = ["ClientHandshake"]

_EBUSY = -16   # AUTH_BAD_METHOD result: server at its connection limit ("kick the client")


class ClientHandshake(Handshake):
    """Client handlers of :data:`~protocol.transitions.TRANSITIONS`."""

    def _on_auth_reply_more(self, more: AuthReplyMore) -> None:
        assert self._client_auth is not None
        self._send_control(AuthRequestMore(self._client_auth.more(bytes(more.payload))))

    def _on_auth_bad_method(self, bad: AuthBadMethod) -> None:
        raise RemoteProtocolError(auth_bad_method_text(bad), "busy" if bad.result == _EBUSY
                                  else "auth")

    def _on_auth_done(self, done: AuthDone) -> None:
        assert self._client_auth is not None
        self._finish_auth(self._client_auth.done(done.global_id, done.con_mode,
                                                 bytes(done.payload)))

    def _on_server_signature(self, sig: AuthSignature) -> Outcome:
        """Resume the session when it knows a server cookie, else start a new one."""
        self._check_signature(sig)
        assert self.session is not None
        if self.session.server_cookie:
            self._send_reconnect()
            return Outcome.RECONNECT
        self._send_client_ident()
        return Outcome.NEW_SESSION

    def _send_client_ident(self) -> None:
        s = self.session
        assert s is not None
        cfg = self.config
        if not s.client_cookie and not s.policy.lossy:
            s.client_cookie = cfg.new_cookie()
        s.global_seq = cfg.next_global_seq(s.global_seq)
        self._send_control(ClientIdent(
            (self._ident_addr(),), self.target_addr, cfg.gid, s.global_seq,
            cfg.ceph_features_supported, cfg.ceph_features_required,
            IDENT_FLAG_LOSSY if s.policy.lossy else 0, s.client_cookie))

    def _send_reconnect(self) -> None:
        s = self.session
        assert s is not None
        s.global_seq = self.config.next_global_seq(s.global_seq)
        self._send_control(SessionReconnect(
            (self.config.my_addr,), s.client_cookie, s.server_cookie, s.global_seq,
            s.connect_seq, s.in_seq))

    def _on_server_ident(self, ident: ServerIdent) -> None:
        s = self.session
        assert s is not None
        unnamed: EntityAddr | None = None
        if not names_dialled(self.target_addr, ident.addrs):
            if self.config.identity_check is IdentityCheck.STRICT:
                raise RemoteProtocolError(mismatch_reason(self.target_addr, ident.addrs),
                                          "bad_ident")
            unnamed = self.target_addr
        s.server_cookie = ident.server_cookie
        s.peer_global_seq = ident.global_seq
        s.connect_seq = 0
        # A fresh session on the server: it has nothing of ours, start numbering from 1.
        s.in_seq = 0
        s.discard_requeued_up_to(0)
        self.peer_addrs = tuple(ident.addrs)
        self._events.append(Ready(False, self.peer_type, self.peer_addrs, unnamed))

    def _ident_addr(self) -> EntityAddr:
        """Our address for CLIENT_IDENT: with no IP of our own (a client that never
        bound), the IP the server told us in HELLO, as Ceph clients do."""
        me, seen = self.config.my_addr, self.learned_addr
        if me.host or seen is None or not seen.host:
            return me
        return EntityAddr(me.nonce, seen.host, 0, me.type)

    def _on_missing_features(self, m: IdentMissingFeatures) -> None:
        raise RemoteProtocolError(missing_features_text(m.features), "features")

    def _on_wait(self, _w: Wait) -> None:
        self._events.append(WaitReceived())

    def _on_reconnect_ok(self, ok: SessionReconnectOk) -> None:
        s = self.session
        assert s is not None
        s.discard_requeued_up_to(ok.msg_seq)
        self._events.append(Ready(True, self.peer_type, self.peer_addrs))

    def _on_session_reset(self, reset: SessionReset) -> None:
        s = self.session
        assert s is not None
        if reset.full:
            s.reset()
        else:
            s.server_cookie = 0
            s.connect_seq = 0
            s.in_seq = 0
        self._events.append(ResetReceived(reset.full))
        self._send_client_ident()

    def _on_retry(self, retry: SessionRetry) -> None:
        assert self.session is not None
        self.session.connect_seq = retry.connect_seq + 1
        self._events.append(RetryReceived(False, retry.connect_seq))
        self._send_reconnect()

    def _on_retry_global(self, retry: SessionRetryGlobal) -> None:
        assert self.session is not None
        self.session.global_seq = max(self.session.global_seq, retry.global_seq)
        self._events.append(RetryReceived(True, retry.global_seq))
        self._send_reconnect()
