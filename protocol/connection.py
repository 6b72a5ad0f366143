"""One socket's worth of msgr2: the handshake and the frame exchange, sans I/O.

Usage (h11 shape, with an outbox because replies arise from input):

    conn = Connection(Role.CLIENT, config, session=Session(policy))
    out = conn.data_to_send()            # banner; write these buffers
    conn.receive_data(bytes_from_peer)   # or get_buffer()/buffer_updated() for zero copy
    while (ev := conn.next_event()) is not NEED_DATA:
        ...                              # Ready, MessageReceived, IdentRequest, ...
    conn.write_messages()                # encode queued session messages into the outbox

Handshake (crc mode). Both roles first exchange banners, then HELLO:

    client                                   server
    banner, HELLO            ─────────▶      banner, HELLO
    AUTH_REQUEST             ─────────▶      AUTH_DONE, AUTH_SIGNATURE
    AUTH_SIGNATURE           ─────────▶
    CLIENT_IDENT | SESSION_RECONNECT ──▶      (owner decides: IdentRequest/ReconnectRequest)
                             ◀─────────      SERVER_IDENT | RECONNECT_OK | RESET | RETRY* | WAIT
    READY: MESSAGE / ACK / KEEPALIVE2 / KEEPALIVE2_ACK in both directions

Every legal (role, state, tag) lives in :data:`protocol.transitions.TRANSITIONS` (the code
obeys only that table and LOCAL_TRANSITIONS); anything else is a remote
protocol error that faults the connection (never the worker). The owner supplies time,
randomness and the session registry, so the whole exchange is testable without sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from . import features as feat
from .auth import AuthResult, ClientAuth, NoneClientAuth, NoneServerAuth, ServerAuth, signature
from .ceph import features as ceph_feat
from .control import MODE_SECURE
from .secure import TAG_SIZE, SecureChannel
from .control import (
    IDENT_FLAG_LOSSY, Ack, AuthBadMethod, AuthDone, AuthReplyMore, AuthRequest,
    AuthRequestMore, AuthSignature, ClientIdent, EntityAddr, Hello, IdentMissingFeatures,
    Keepalive2, Keepalive2Ack, ServerIdent, SessionReconnect, SessionReconnectOk,
    SessionReset, SessionRetry, SessionRetryGlobal, Wait, decode_control, encode_control,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .identity import IdentityCheck, mismatch_reason, names_dialled
from .frames import (
    Banner, Buffer, FrameDecoder, FrameLimits, Tag, encode_banner, tag_name,
)
from .message import MAX_FRONT, Message, decode_message, encode_messages
from .replies import auth_bad_method_text, missing_features_text, server_bad_method
from .session import Session
from .transcript import Transcript
from .transitions import LOCAL_TRANSITIONS, TRANSITIONS, Local, Outcome, Role, State

__all__ = [
    "Role", "State", "Config", "Connection", "NEED_DATA", "TRANSITIONS",
    "Local", "Outcome", "LOCAL_TRANSITIONS", "Ready", "IdentRequest", "ReconnectRequest", "ResetReceived", "RetryReceived",
    "WaitReceived", "MessageReceived", "KeepaliveReceived", "KeepaliveAckReceived",
    "Event",
]

_EBUSY = -16   # AUTH_BAD_METHOD result: server at its connection limit ("kick the client")


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Any = _NeedData()


# -- events ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ready:
    """Handshake complete; ``resumed`` when an existing session continued."""

    resumed: bool
    peer_type: int
    peer_addrs: tuple[EntityAddr, ...]
    #: the address we dialled, when the server named others and the identity check
    #: recorded them instead of refusing (port forwarding); None when they matched
    unnamed_target: EntityAddr | None = None


@dataclass(frozen=True, slots=True)
class IdentRequest:
    """Server: the client asks for a new session. Decide, then call accept_new_session()
    or reject()."""

    ident: ClientIdent
    peer_type: int


@dataclass(frozen=True, slots=True)
class ReconnectRequest:
    """Server: the client asks to resume a session. Decide, then accept_reconnect() or
    reject()."""

    request: SessionReconnect
    peer_type: int


@dataclass(frozen=True, slots=True)
class ResetReceived:
    """Client: the server has no (or a different) session. The connection already reset
    the session when ``full`` and sent CLIENT_IDENT; the owner notifies the dispatcher."""

    full: bool


@dataclass(frozen=True, slots=True)
class RetryReceived:
    """Client: the server asked us to retry with a higher connect_seq/global_seq (already
    done by the connection; informational)."""

    global_: bool
    value: int


@dataclass(frozen=True, slots=True)
class WaitReceived:
    """Client: the server's own outgoing connection wins a race; back off and retry."""


class MessageReceived:
    """A message arrived (delivered once per session, in order). A plain slotted class:
    one is built per message, and frozen dataclasses cost several times more to build."""

    __slots__ = ("message",)

    def __init__(self, message: Message) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"MessageReceived({self.message!r})"


@dataclass(frozen=True, slots=True)
class KeepaliveReceived:
    stamp: tuple[int, int]


@dataclass(frozen=True, slots=True)
class KeepaliveAckReceived:
    stamp: tuple[int, int]


Event = Union[Ready, IdentRequest, ReconnectRequest, ResetReceived, RetryReceived,
              WaitReceived, MessageReceived, KeepaliveReceived, KeepaliveAckReceived]


@dataclass
class Config:
    """Per-messenger handshake parameters (no I/O inside)."""

    entity_type: int
    my_addr: EntityAddr
    gid: int = 0
    features_supported: int = feat.SUPPORTED          # banner bits
    features_required: int = feat.REQUIRED
    ceph_features_supported: int = ceph_feat.SUPPORTED  # CLIENT_IDENT / SERVER_IDENT
    ceph_features_required: int = ceph_feat.REQUIRED
    limits: FrameLimits = field(default_factory=FrameLimits)
    client_auth: Callable[[], ClientAuth] = NoneClientAuth
    #: one ServerAuth per accepted connection (it may hold that connection's nonces)
    server_auth: Callable[[], ServerAuth] = NoneServerAuth
    #: fresh messenger-wide global_seq strictly greater than the argument
    next_global_seq: Callable[[int], int] = lambda old: old + 1
    #: random non-zero 64-bit cookie
    new_cookie: Callable[[], int] = lambda: 1
    #: a client's judgement of SERVER_IDENT addresses (:mod:`protocol.identity`)
    identity_check: IdentityCheck = IdentityCheck.STRICT


_ASYNCMSGR = feat.ASYNCMSGR


class Connection:
    """The msgr2 exchange over one socket. Not thread-safe; owned by one event loop."""

    def __init__(self, role: Role, config: Config, session: Session | None = None,
                 seen_peer_addr: EntityAddr | None = None,
                 target_addr: EntityAddr | None = None, *, send_banner: bool = True) -> None:
        if role is Role.CLIENT and session is None:
            raise LocalProtocolError("a client connection needs its session up front")
        self.role = role
        self.config = config
        self.session = session
        self.state = State.BANNER
        self.decoder = FrameDecoder(config.limits)
        self.peer_type = 0
        self.peer_addrs: tuple[EntityAddr, ...] = ()
        self.peer_features = 0
        #: the peer's family, from its banner (read per message, so kept as two flags):
        #: asyncmsgr takes msgpack messages; a Ceph peer (banner known, no asyncmsgr
        #: bit) must never be sent one
        self.asyncmsgr_peer = False
        self.ceph_peer = False
        self.seen_peer_addr = seen_peer_addr or EntityAddr(0, "", 0)
        self.target_addr = target_addr or EntityAddr(0, "", 0)
        self.learned_addr: EntityAddr | None = None
        self.auth_method = 0  # server: the method the client asked for
        self.auth: AuthResult | None = None
        self.pending_request: ClientIdent | SessionReconnect | None = None
        self._client_auth: ClientAuth | None = config.client_auth() if role is Role.CLIENT else None
        self._server_auth: ServerAuth | None = config.server_auth() if role is Role.SERVER else None
        self._secure: SecureChannel | None = None
        self._scratch: bytearray | None = None
        self._error: RemoteProtocolError | None = None
        self._lent: memoryview | None = None
        self._out: list[Buffer] = []
        self._peer_signature: bytes | None = None
        self._events: list[Event] = []
        self.messages_in = 0
        self.messages_out = 0
        self.transcript = Transcript(self._wants_transcript())
        banner = encode_banner(config.features_supported, config.features_required)
        self.transcript.sent((banner,))
        if send_banner:  # False: the connection continues one whose banner went out
            self._out.append(banner)

    # -- I/O surface -----------------------------------------------------------------
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._secure is not None:
            if self._scratch is None:
                self._scratch = bytearray(256 * 1024)
            return memoryview(self._scratch)
        view = self.decoder.get_buffer(sizehint)
        self._lent = view if self.transcript.recording else None
        return view

    def buffer_updated(self, nbytes: int) -> None:
        if self._secure is not None:
            assert self._scratch is not None
            self._feed_secure(memoryview(self._scratch)[:nbytes])
            return
        if self._lent is not None:
            self.transcript.received(self._lent[:nbytes])
            self._lent = None
        self.decoder.buffer_updated(nbytes)

    def receive_data(self, data: Buffer) -> None:
        if self._secure is not None:
            self._feed_secure(data)
            return
        self.transcript.received(data)
        self.decoder.feed(data)

    def _feed_secure(self, data: Buffer) -> None:
        assert self._secure is not None
        if self._error is not None:
            return
        try:
            plains = self._secure.feed(data)
        except RemoteProtocolError as err:
            # Surface from next_event(), like every other error in the received stream.
            self._error = err
            return
        for plain in plains:
            self.decoder.feed(plain)

    def _enable_secure(self, session_key: bytes | None) -> None:
        """Switch both directions to AES-GCM records (right after AUTH_DONE)."""
        if not session_key:
            raise LocalProtocolError("secure mode needs a session key (auth none cannot "
                                     "provide one)", "secure")
        lim = self.config.limits
        max_record = 32 + 4 + 3 * lim.segment_max + lim.data_max + 13 + TAG_SIZE
        self._secure = SecureChannel(session_key, self.role is Role.CLIENT, max_record)
        # Bytes after AUTH_DONE already sitting in the decoder are ciphertext.
        pending = self.decoder.take_pending()
        if pending:
            self._feed_secure(pending)

    @property
    def secure(self) -> bool:
        return self._secure is not None

    def data_to_send(self) -> list[Buffer]:
        out = self._out
        self._out = []
        return out

    def has_data_to_send(self) -> bool:
        return bool(self._out)

    @property
    def is_ready(self) -> bool:
        return self.state is State.READY

    # -- the event pump -------------------------------------------------------------------
    def next_event(self) -> Event | Any:
        """Next event, or NEED_DATA. Raises RemoteProtocolError on bad input."""
        if self._events:
            return self._events.pop(0)
        if self._error is not None:
            raise self._error
        dec = self.decoder
        while True:
            state = self.state
            if state is State.READY:
                segments = dec.next_message()
                if segments is not None:
                    ev = self._on_message_frame(segments)
                    if ev is not None:
                        return ev
                    continue
                frame = dec.next_frame()
                if frame is None:
                    return NEED_DATA
                tag = frame.tag
                if tag == Tag.MESSAGE:
                    ev = self._on_message_frame(frame.segments)
                    if ev is not None:
                        return ev
                    continue
            elif state is State.BANNER:
                banner = dec.next_banner()
                if banner is None:
                    return NEED_DATA
                self._on_banner(banner)
                continue
            elif state is State.CLOSED:
                return NEED_DATA  # nothing more is read from a closed exchange
            else:
                frame = dec.next_frame()
                if frame is None:
                    return NEED_DATA
                tag = frame.tag
            entry = TRANSITIONS.get((self.role, state, tag))
            if entry is None:
                self.state = State.CLOSED
                raise RemoteProtocolError(
                    f"unexpected {tag_name(tag)} frame in state {state.value} "
                    f"({self.role.value}); the peer is not following msgr2", "bad_tag")
            handler, then = entry
            try:
                outcome = getattr(self, handler)(decode_control(tag, frame.segments[0]))
            except ProtocolError:
                self.state = State.CLOSED  # a refused frame never leaves us READY
                raise
            nxt = then.get(outcome or Outcome.DONE)
            if nxt is None:
                self.state = State.CLOSED
                raise LocalProtocolError(f"{handler} chose {outcome}, which its row of "
                                         "TRANSITIONS does not have", "bad_state")
            self.state = nxt
            if self._events:
                return self._events.pop(0)

    def _fire(self, trigger: Local) -> None:
        """Move along LOCAL_TRANSITIONS (the one writer of ``state`` besides the pump)."""
        nxt = LOCAL_TRANSITIONS.get((self.role, self.state, trigger))
        if nxt is None:
            raise LocalProtocolError(f"{trigger.value} is not allowed in state "
                                     f"{self.state.value} ({self.role.value})", "bad_state")
        self.state = nxt

    # -- transcript (for AUTH_SIGNATURE) ----------------------------------------------
    def _wants_transcript(self) -> bool:
        if self._client_auth is not None:
            return self._client_auth.wants_transcript
        return self._server_auth is not None and self._server_auth.wants_transcript

    def _send_control(self, obj: Any) -> None:
        bufs = encode_control(obj)
        if self.auth is None:
            self.transcript.sent(bufs)
        if self._secure is not None:
            self._out.append(self._secure.seal(bufs))
        else:
            self._out.extend(bufs)

    def _set_peer_features(self, bits: int) -> None:
        self.peer_features = bits
        self.asyncmsgr_peer = bits & _ASYNCMSGR != 0
        self.ceph_peer = bits != 0 and not self.asyncmsgr_peer

    # -- handshake handlers -------------------------------------------------------------
    def _on_banner(self, banner: Banner) -> None:
        cfg = self.config
        missing = cfg.features_required & ~banner.supported
        if missing:
            raise RemoteProtocolError(
                f"peer lacks required msgr2 features {missing:#x}; upgrade the peer", "features")
        if banner.required & ~cfg.features_supported:
            raise RemoteProtocolError(
                f"peer requires msgr2 features {banner.required & ~cfg.features_supported:#x} "
                "that this build does not support", "features")
        if not banner.supported & feat.REVISION_1:
            raise RemoteProtocolError("peer does not speak msgr2.1 (REVISION_1)", "features")
        self._set_peer_features(banner.supported)
        self._fire(Local.BANNER)
        peer = self.target_addr if self.role is Role.CLIENT else self.seen_peer_addr
        self._send_control(Hello(int(cfg.entity_type), peer))

    def _on_hello(self, hello: Hello) -> None:
        self.peer_type = hello.entity_type
        self.learned_addr = hello.peer_addr
        if self.role is Role.CLIENT:
            assert self._client_auth is not None
            method, modes, payload = self._client_auth.request()
            self._send_control(AuthRequest(method, modes, payload))

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

    def _finish_auth(self, result: AuthResult) -> None:
        self.auth = result
        # Cut the transcript before secure mode takes the (ciphertext) rest of the buffer.
        rx = self.transcript.finish_received(self.decoder.buffered)
        if result.con_mode == MODE_SECURE:
            self._enable_secure(result.session_key)
        self._send_control(AuthSignature(signature(result.session_key, rx)))

    def _on_signature(self, sig: AuthSignature) -> Outcome:
        assert self.auth is not None
        expected = signature(self.auth.session_key, self.transcript.sent_bytes())
        if bytes(sig.sha256) != expected:
            raise RemoteProtocolError("AUTH_SIGNATURE mismatch: the pre-auth exchange was "
                                      "altered in transit", "auth_signature")
        self.transcript.stop()
        if self.role is Role.SERVER:
            return Outcome.DONE
        assert self.session is not None
        if self.session.server_cookie:
            self._send_reconnect()
            return Outcome.RECONNECT
        self._send_client_ident()
        return Outcome.NEW_SESSION

    # -- client: ident / reconnect ---------------------------------------------------------
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

    # -- server: ident / reconnect -----------------------------------------------------------
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

    # -- READY ----------------------------------------------------------------------------
    def _on_message_frame(self, segments: Sequence[memoryview]) -> Event | None:
        msg = decode_message(segments, MAX_FRONT, self.asyncmsgr_peer)
        s = self.session
        assert s is not None
        sent = s.sent
        if sent and sent[0].seq <= msg.ack_seq:
            s.on_ack(msg.ack_seq)
        if not s.on_receive(msg.seq):
            return None
        self.messages_in += 1
        return MessageReceived(msg)

    def _on_ack(self, ack: Ack) -> None:
        assert self.session is not None
        self.session.on_ack(ack.seq)

    def _on_keepalive(self, ka: Keepalive2) -> None:
        self._send_control(Keepalive2Ack(ka.sec, ka.nsec))
        self._events.append(KeepaliveReceived((ka.sec, ka.nsec)))

    def _on_keepalive_ack(self, ka: Keepalive2Ack) -> None:
        self._events.append(KeepaliveAckReceived((ka.sec, ka.nsec)))

    def write_messages(self, max_messages: int = 1 << 30) -> int:
        """Encode queued session messages (and a standalone ACK when owed) into the
        outbox. Returns the number of messages written."""
        if self.state is not State.READY:
            return 0
        s = self.session
        assert s is not None
        sec = self._secure
        batch = s.take_outgoing(max_messages)
        encode_messages(batch, self.asyncmsgr_peer, self._out,
                        None if sec is None else sec.seal)
        n = len(batch)
        if n == 0 and s.ack_pending:
            s.ack_pending = 0
            self._send_control(Ack(s.in_seq))
        self.messages_out += n
        return n

    def send_keepalive(self, stamp: tuple[int, int]) -> None:
        """Queue a KEEPALIVE2 carrying the caller's timestamp (sec, nsec)."""
        if self.state is State.READY:
            self._send_control(Keepalive2(stamp[0], stamp[1]))

    def close(self) -> None:
        self._fire(Local.CLOSE)

    # -- handoff ----------------------------------------------------------------------
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

    def _export_stream(self) -> dict[str, Any]:
        """Auth outcome, secure-mode keys and counters, and unparsed bytes."""
        sec = self._secure
        return {
            "peer_features": self.peer_features,  # banner bits: is the peer asyncmsgr?
            "global_id": self.auth.global_id if self.auth else 0,
            "con_mode": self.auth.con_mode if self.auth else 0,
            "session_key": (self.auth.session_key or b"") if self.auth else b"",
            "counters": [sec.tx_counter, sec.rx_counter] if sec else None,
            "cipher_pending": sec.take_pending() if sec else b"",
            "pending": self.decoder.take_pending(),
        }

    def _import_stream(self, state: dict[str, Any]) -> None:
        key = bytes(state.get("session_key") or b"") or None
        self._set_peer_features(int(state["peer_features"]))
        self.auth = AuthResult(int(state["global_id"]), int(state["con_mode"]), key)
        if state.get("pending"):
            self.decoder.feed(state["pending"])
        counters = state.get("counters")
        if counters is not None:
            self._enable_secure(key)
            assert self._secure is not None
            self._secure.tx_counter, self._secure.rx_counter = int(counters[0]), int(counters[1])
            if state.get("cipher_pending"):
                self._feed_secure(state["cipher_pending"])

    @classmethod
    def import_handshake(cls, config: Config, state: dict[str, Any]
                         ) -> tuple[Connection, IdentRequest | ReconnectRequest]:
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

    def export_ready(self) -> dict[str, Any]:
        """Stream state of a READY connection (the session itself is exported by the
        owner); the connection must not be used afterwards."""
        if self.state is not State.READY:
            raise LocalProtocolError("only a READY connection can be migrated")
        self._fire(Local.EXPORT_READY)
        return self._export_stream()

    @classmethod
    def import_ready(cls, role: Role, config: Config, session: Session, peer_type: int,
                     peer_addrs: tuple[EntityAddr, ...], stream: dict[str, Any]) -> Connection:
        """A READY connection continuing a migrated session on a handed-off socket."""
        conn = cls(role, config, session if role is Role.CLIENT else None, send_banner=False)
        conn.adopt_ready(session, peer_type, peer_addrs, stream)
        return conn

    def adopt_ready(self, session: Session, peer_type: int,
                    peer_addrs: tuple[EntityAddr, ...], stream: dict[str, Any]) -> None:
        """A fresh connection continues a migrated session (import_ready)."""
        self.session = session
        self.peer_type = peer_type
        self.peer_addrs = peer_addrs
        self._fire(Local.IMPORT_READY)
        self._import_stream(stream)

    def restore_ready(self, stream: dict[str, Any]) -> None:
        """Undo export_ready (the handoff was refused): keep serving this socket."""
        self._fire(Local.RESTORE_READY)
        self._import_stream(stream)
