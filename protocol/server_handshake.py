"""The server's half of the msgr2 handshake: auth requests, CLIENT_IDENT /
SESSION_RECONNECT handed to the owner as events, its decision (accept or reject), and
the export of a pending request to the process that owns the session."""

from __future__ import annotations

from typing import Any, Self

from .auth import AuthResult
from .config import Config
from .control import (
    IDENT_FLAG_LOSSY, AuthDone, AuthReplyMore, AuthRequest, AuthRequestMore, AuthSignature,
    ClientIdent, EntityAddr, IdentMissingFeatures, ServerIdent, SessionReconnect,
    SessionReconnectOk, SessionReset, SessionRetry, SessionRetryGlobal, Wait, decode_control,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .events import IdentRequest, ReconnectRequest
from .handshake import Handshake
from .replies import server_bad_method
from .session import Session
from .transitions import Local, Outcome, Role, State

__all__ = ["ServerHandshake"]


class ServerHandshake(Handshake):
    """Server handlers of :data:`~protocol.transitions.TRANSITIONS` and the owner's calls."""

    def _on_auth_request(self, req: AuthRequest) -> Outcome:
        assert self._server_auth is not None
        self.auth_method = req.method
        return self._server_auth_outcome(self._server_auth.handle_request(
            req.method, tuple(req.preferred_modes), bytes(req.payload)))

    def _on_auth_request_more(self, req: AuthRequestMore) -> Outcome:
        assert self._server_auth is not None
        return self._server_auth_outcome(self._server_auth.handle_more(bytes(req.payload)))

    def _server_auth_outcome(self, outcome: tuple[str, object]) -> Outcome:
        kind, value = outcome
        if kind == "more":
            assert isinstance(value, bytes)
            self._send_control(AuthReplyMore(value))
            return Outcome.AUTH_MORE
        if kind == "done":
            assert isinstance(value, AuthResult)
            self._send_control(AuthDone(value.global_id, value.con_mode, b""))
            self._finish_auth(value)
            return Outcome.DONE
        busy = kind == "busy"
        assert self._server_auth is not None
        self._send_control(server_bad_method(self._server_auth, busy, self.auth_method))
        raise RemoteProtocolError(f"{'refused' if busy else 'authentication rejected'}: "
                                      f"{value}", "busy" if busy else "auth")

    def _on_client_signature(self, sig: AuthSignature) -> None:
        self._check_signature(sig)

    def _on_client_ident(self, ident: ClientIdent) -> None:
        if not ident.addrs:
            raise RemoteProtocolError("CLIENT_IDENT without an address", "bad_ident")
        missing = self.config.ceph_features_required & ~ident.features_supported
        if missing:
            self._send_control(IdentMissingFeatures(missing))
            return
        self.peer_addrs = tuple(ident.addrs)
        self.pending_request = ident
        self._events.append(IdentRequest(ident, self.peer_type))

    def _on_reconnect(self, req: SessionReconnect) -> None:
        if not req.addrs:
            raise RemoteProtocolError("SESSION_RECONNECT without an address", "bad_ident")
        self.peer_addrs = tuple(req.addrs)
        self.pending_request = req
        self._events.append(ReconnectRequest(req, self.peer_type))

    def accept_new_session(self, session: Session, server_cookie: int) -> None:
        """Server: answer the pending CLIENT_IDENT with SERVER_IDENT; the session starts."""
        ident = self.pending_request
        if self.state is not State.SESSION_ACCEPTING or not isinstance(ident, ClientIdent):
            raise LocalProtocolError("no CLIENT_IDENT pending")
        cfg = self.config
        self.session = session
        session.client_cookie = ident.client_cookie
        session.peer_global_seq = ident.global_seq
        if not session.policy.lossy and not session.server_cookie:
            session.server_cookie = server_cookie
        session.in_seq = 0
        session.discard_requeued_up_to(0)
        session.global_seq = cfg.next_global_seq(session.global_seq)
        self.pending_request = None
        self._fire(Local.ACCEPT_SESSION)
        self._send_control(ServerIdent(
            (cfg.my_addr,), cfg.gid, session.global_seq, cfg.ceph_features_supported,
            cfg.ceph_features_required, IDENT_FLAG_LOSSY if session.policy.lossy else 0,
            session.server_cookie))

    def accept_reconnect(self, session: Session) -> None:
        """Server: resume ``session`` for the pending SESSION_RECONNECT."""
        req = self.pending_request
        if self.state is not State.SESSION_ACCEPTING or not isinstance(req, SessionReconnect):
            raise LocalProtocolError("no SESSION_RECONNECT pending")
        self.session = session
        session.connect_seq = req.connect_seq  # adopt (notes §2.5, last row)
        session.peer_global_seq = req.global_seq
        session.requeue_sent()
        session.discard_requeued_up_to(req.msg_seq)
        self.pending_request = None
        self._fire(Local.ACCEPT_RECONNECT)
        self._send_control(SessionReconnectOk(session.in_seq))

    def reject(self, verdict: str, *, full: bool = True, value: int = 0) -> None:
        """Server: answer the pending request with RESET / RETRY / RETRY_GLOBAL / WAIT."""
        if self.state is not State.SESSION_ACCEPTING:
            raise LocalProtocolError(f"cannot reject in state {self.state.value}")
        self.pending_request = None
        self._fire(Local.REJECT)
        if verdict == "reset":
            self._send_control(SessionReset(full))
        elif verdict == "retry":
            self._send_control(SessionRetry(value))
        elif verdict == "retry_global":
            self._send_control(SessionRetryGlobal(value))
        elif verdict == "wait":
            self._send_control(Wait())
        else:
            raise LocalProtocolError(f"unknown rejection {verdict!r}")

    # -- handoff of a pending request ---------------------------------------------------
    def export_handshake(self) -> dict[str, Any]:
        """State of a server connection waiting in SESSION_ACCEPTING, so another process
        can finish the handshake on the same socket (the pool's reconnect routing)."""
        if self.role is not Role.SERVER or self.state is not State.SESSION_ACCEPTING \
                or self.pending_request is None:
            raise LocalProtocolError("only a server connection with a pending session "
                                     "request can be exported")
        req = self.pending_request
        return {
            "peer_type": self.peer_type,
            "seen_peer_addr": self.seen_peer_addr.encode(),
            "tag": int(req.TAG),
            "request": req.encode(),
            **self._export_stream(),
        }

    @classmethod
    def import_handshake(cls, config: Config, state: dict[str, Any]
                         ) -> tuple[Self, IdentRequest | ReconnectRequest]:
        """Rebuild an exported server connection; returns it and the request event."""
        conn = cls(Role.SERVER, config, send_banner=False)  # the exporter sent it
        return conn, conn.adopt_handshake(state)

    def adopt_handshake(self, state: dict[str, Any]) -> IdentRequest | ReconnectRequest:
        """A fresh server connection takes over an exported one (import_handshake)."""
        self.peer_type = int(state["peer_type"])
        self.seen_peer_addr = EntityAddr.decode(memoryview(state["seen_peer_addr"]))
        self._fire(Local.IMPORT_HANDSHAKE)
        req = decode_control(int(state["tag"]), memoryview(state["request"]))
        self._import_stream(state)
        if isinstance(req, ClientIdent):
            self._on_client_ident(req)
        elif isinstance(req, SessionReconnect):
            self._on_reconnect(req)
        else:
            raise RemoteProtocolError("exported handshake holds no session request", "handoff")
        ev = self._events.pop(0)
        assert isinstance(ev, (IdentRequest, ReconnectRequest))
        return ev
