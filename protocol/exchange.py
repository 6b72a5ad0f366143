"""The stream half of a msgr2 connection, sans-I/O: bytes in, frames dispatched along
:data:`protocol.transitions.TRANSITIONS`, the outbox, secure mode, and READY's frames.

:class:`Exchange` is the base of :class:`protocol.connection.Connection`; the handshake
handlers the table names live in :mod:`protocol.handshake` (both roles),
:mod:`protocol.client_handshake` and :mod:`protocol.server_handshake`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from . import features as feat
from .auth import AuthResult, ClientAuth, ServerAuth
from .config import Config
from .control import (
    Ack, ClientIdent, EntityAddr, Hello, Keepalive2, Keepalive2Ack, SessionReconnect,
    decode_control, encode_control,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    NEED_DATA, Event, KeepaliveAckReceived, KeepaliveReceived, MessageReceived,
)
from .frames import Banner, Buffer, FrameDecoder, Tag, encode_banner, tag_name
from .message import MAX_FRONT, Message, decode_message, decode_messages, encode_messages
from .secure import TAG_SIZE, SecureChannel
from .session import Session
from .transcript import Transcript
from .transitions import LOCAL_TRANSITIONS, TRANSITIONS, Local, Outcome, Role, State

__all__ = ["Exchange"]

_ASYNCMSGR = feat.ASYNCMSGR
# assigned, not imported: a method call on an imported name is compiled as an attribute
# load plus a bound method per call (CPython 3.11), and the pump runs per control frame
_row = TRANSITIONS.get
_local_row = LOCAL_TRANSITIONS.get
#: messages decoded per batch call: bounds the work done ahead of a consumer that stops
_BATCH = 64


class Exchange:
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
            entry = _row((self.role, state, tag))
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
        nxt = _local_row((self.role, self.state, trigger))
        if nxt is None:
            raise LocalProtocolError(f"{trigger.value} is not allowed in state "
                                     f"{self.state.value} ({self.role.value})", "bad_state")
        self.state = nxt

    # -- transcript (for AUTH_SIGNATURE), outbox, banner -------------------------------
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

    # -- READY ----------------------------------------------------------------------------
    def received_messages(self) -> Iterator[Message]:
        """The messages of the plain MESSAGE frames at the head of the stream, decoded in
        one batch call (:func:`protocol.message.decode_messages`) and handed out in order.

        Each frame is consumed, and counted by the session (seq, duplicates, acks owed),
        only as its message is handed out: a consumer that stops early (throttled, the
        connection closed) leaves the rest in the stream, where the next batch or
        :meth:`next_event` finds it, so nothing is lost or counted twice. Duplicates are
        dropped on the way. Empty when the batch does not apply (not READY, events
        waiting, the next frame not a plain MESSAGE frame): :meth:`next_event` then
        handles what comes next, with the same result for messages.
        """
        if self.state is not State.READY or self._events or self._error is not None:
            return
        dec = self.decoder
        span = dec.message_span()
        if span is None:
            return
        mv, at, end, segment_max, data_max = span
        msgs, ends, max_ack = decode_messages(mv, at, end, segment_max, data_max, MAX_FRONT,
                                              self.asyncmsgr_peer, _BATCH)
        if not msgs:
            return
        s = self.session
        assert s is not None
        s.on_ack(max_ack)  # acks are cumulative: the batch's highest covers the rest
        advance, on_receive = dec.advance, s.on_receive
        ready = State.READY
        for msg, nxt in zip(msgs, ends):
            if self.state is not ready or not advance(mv, at, nxt):
                return  # closed, or the stream moved under a stale batch
            at = nxt
            if on_receive(msg.seq):
                self.messages_in += 1
                yield msg

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

    # -- stream state for handoff ---------------------------------------------------------
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
