"""AsyncConnection: a protocol session glued to a ConnectedSocket on one EventCenter.

One object per peer session. Sockets come and go beneath it (faults, reconnects, a
replacing socket from the peer); the :class:`~protocol.session.Session` with its queues
and sequence numbers stays. Everything runs on the owning EventCenter's thread.

Every state change is an event of the table in :mod:`.states` (``fire`` is the only
writer of ``state``). What it needs from its Messenger is :class:`.owner.ConnectionOwner`;
the Messenger and apps steer it through the public methods below (``start_connect``,
``accept``, ``pause_reading``/``resume_reading``, ``schedule_flush``, ``fault``,
``close``, ``hand_off``), never its private members.

The socket half (file events, read loop, output) is :class:`.socket_io.SocketIO`.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from protocol.connection import (
    NEED_DATA, Connection, IdentRequest, KeepaliveAckReceived, KeepaliveReceived,
    MessageReceived, Ready, ReconnectRequest, ResetReceived, RetryReceived, WaitReceived,
)
from protocol.control import EntityAddr
from protocol.errors import ProtocolError
from protocol.message import Message, check_outgoing
from protocol.policy import Policy
from protocol.session import Session, SessionView
from transport.event_center import READABLE, WRITABLE
from transport.stack import Address, ConnectedSocket

from .failure import UNRETRYABLE, HandshakeFailure
from .owner import ConnectionOwner
from .socket_io import SocketIO
from .states import ConnEvent, ConnState

__all__ = ["AsyncConnection"]

log = logging.getLogger("pool.messenger.connection")

#: While a large batch of received messages is dispatched, replies queued so far are
#: sent every this many messages, so the peer works on them while we go on: without
#: it a full window crosses as one batch each way and the two sides take turns.
#: Measured at window 128, 64 B echo, two processes: TCP 42k -> 90k req/s, memif
#: poll mode 36k -> 97k (BENCHMARKS.md has the runs).
_FLUSH_EVERY = 32


class AsyncConnection(SocketIO):
    """A session with a peer and, at times, a socket to it.

    Private session bookkeeping beside ``state`` (none of it is a connection state):
    ``_wait_received`` remembers the peer's WAIT (connection race) until the next READY,
    which makes faults back off at the maximum; ``_was_ready`` (the session was READY
    once) tells connects from reconnects; ``_parked`` is the message the throttles
    refused (``_throttled``).
    """

    def __init__(self, msgr: ConnectionOwner[AsyncConnection], policy: Policy, *,
                 peer_addr: Address | None, outgoing: bool) -> None:
        super().__init__(msgr, outgoing)
        self._queue_limit = msgr.config.out_queue_limit  # per message: copied once
        self.policy = policy
        self.peer_addr = peer_addr            # where to dial (outgoing only)
        self.outgoing = outgoing
        self.session = Session(policy) if outgoing else None
        self.key: str | None = None           # registry key (peer identity)
        self.peer_type = 0
        self.peer_addrs: tuple[EntityAddr, ...] = ()
        self.backoff = 0.0
        self._was_ready = False
        self._wait_received = False
        self._timer: int | None = None
        self._parked: Message | None = None
        self.connect_started = self.last_active
        self.last_keepalive_ack: tuple[int, int] | None = None
        self.faults = 0
        #: the reason of the latest fault (connect refused, protocol error, EOF), in words
        self.last_error: str | None = None
        self._logged_failure: str | None = None
        self.priv: Any = None                 # for the application (Ceph's Connection priv)

    def __repr__(self) -> str:
        return f"<AsyncConnection {self.key or self.peer_addr} {self.state.value}>"

    # -- public API --------------------------------------------------------------------------
    def send_message(self, msg: Message) -> None:
        """Queue ``msg``; it goes out in priority order once the session is READY.

        The front is encoded here, so later changes to ``msg.front`` are not sent.
        Raises ``LocalProtocolError`` (before queueing anything) when the message cannot
        be encoded (a header field out of range, a front msgpack cannot encode) or when it
        is an asyncmsgr message and the peer is a Ceph daemon."""
        wire = self.wire
        check_outgoing(msg, wire is not None and wire.ceph_peer)
        if self.state is ConnState.CLOSED:
            log.debug("send on closed %r dropped", self)
            self.msgr.stats["dropped_closed"] += 1
            return
        assert self.session is not None
        self.session.queue(msg)
        if self.state is ConnState.READY:
            if not self._flush_scheduled:  # (schedule_flush's own test, without its call)
                self.schedule_flush()
        elif self.state is ConnState.STANDBY and not self.policy.server:
            self.start_connect()
        elif self.state is ConnState.STANDBY and not self.outgoing:
            self.msgr.retain_more(self, msg)  # waits for an absent client: it counts

    def send_keepalive(self) -> None:
        if self.wire is not None and self.state is ConnState.READY:
            now = self.center.now()
            self.wire.send_keepalive((int(now), int((now % 1) * 1e9)))
            self.schedule_flush()

    def is_connected(self) -> bool:
        return self.state is ConnState.READY

    def mark_down(self) -> None:
        """Close the connection and forget the session; no callbacks for the caller."""
        self.close(notify=False)

    def expire(self) -> None:
        """Forget a session the server will not keep (standby timeout, retention caps):
        the dispatcher hears ms_handle_reset, the client SESSION_RESET if it returns."""
        self.close(notify=True)

    @property
    def peer_entity(self) -> str:
        return str(self.peer_addrs[0]) if self.peer_addrs else str(self.peer_addr)

    def view(self) -> SessionView:
        s = self.session
        return SessionView(
            closed=self.state is ConnState.CLOSED or s is None,
            replacing=False,  # our reuse_connection is synchronous: never caught midway
            ready_or_standby=self.state in (ConnState.READY, ConnState.STANDBY),
            connecting=self.outgoing and self.state in (
                ConnState.CONNECTING, ConnState.HANDSHAKE, ConnState.BACKOFF),
            lossy=self.policy.lossy,
            server_policy=self.policy.server,
            client_cookie=s.client_cookie if s else 0,
            server_cookie=s.server_cookie if s else 0,
            peer_global_seq=s.peer_global_seq if s else 0,
            connect_seq=s.connect_seq if s else 0,
        )

    # -- connecting ------------------------------------------------------------------------
    def start_connect(self) -> None:
        """Dial ``peer_addr`` (a new session, a client in standby with work, a retry)."""
        assert self.outgoing and self.peer_addr is not None
        self._cancel_timer()
        self._drop_socket()
        self.fire(ConnEvent.DIAL)
        self.connect_started = self.center.now()
        try:
            sock = self.msgr.dial(self.peer_addr)
        except OSError as err:
            self.msgr.count_socket_error(err)
            self.fault(f"connect to {self.peer_addr} failed: {err}", refused=True)
            return
        self._attach(sock)
        if self._space_on_read:
            fd = sock.fileno()
            self.center.create_file_event(fd, READABLE, self._on_connect_ready)
            self._read_fd = fd
        else:
            wfd = sock.write_fileno()
            assert wfd is not None
            fd = wfd
            self.center.create_file_event(fd, WRITABLE, self._on_connect_ready)
            self._write_fd = fd
        self._on_connect_ready(fd)

    def _on_connect_ready(self, _fd: int) -> None:
        sock = self.sock
        if sock is None or self.state is not ConnState.CONNECTING:
            return
        try:
            st = sock.is_connected()
        except OSError as err:
            self.msgr.count_socket_error(err)
            refused = err.errno in (errno.ECONNREFUSED, errno.ECONNRESET)
            self.fault(f"connect to {self.peer_addr} failed: {err.strerror or err}",
                       refused=refused)
            return
        if st == 0:
            return
        self._unregister_all()
        assert self.session is not None and self.peer_addr is not None
        self.wire = self.msgr.client_wire(self.session, self.peer_addr)
        self.fire(ConnEvent.CONNECTED)
        self._start_io()

    # -- accepting -------------------------------------------------------------------------
    def accept(self, sock: ConnectedSocket, wire: Connection) -> None:
        """Start serving an accepted socket (handshake first)."""
        self._attach(sock)
        self.wire = wire
        self.fire(ConnEvent.ACCEPTED)
        self._start_io()

    def adopt_ready(self, sock: ConnectedSocket, wire: Connection) -> None:
        """Serve a session migrated here with its socket: ``wire`` is READY already."""
        self.accept(sock, wire)
        self.fire(ConnEvent.READY)

    def adopt_standby(self) -> None:
        """Keep a session migrated here without a socket: its client is away."""
        self.fire(ConnEvent.ADOPTED_STANDBY)
        self._was_ready = True

    def replace_socket(self, sock: ConnectedSocket, wire: Connection) -> None:
        """Ceph's ``reuse_connection``: take over a newer socket for this session."""
        self._cancel_timer()
        if self.session is not None and not self.policy.lossy:
            self.session.requeue_sent()
        self._drop_socket()
        self._attach(sock)
        self.wire = wire
        self.fire(ConnEvent.REPLACED)
        self._start_io()

    # -- reading ---------------------------------------------------------------------------
    def _process(self) -> None:
        """Handle every complete frame already received (until throttled)."""
        wire = self.wire
        if wire is None or self._throttled or self._write_blocked:
            return
        msgr = self.msgr
        delivered = 0
        # Messages come in batches (Exchange.received_messages: one compiled call decodes
        # every plain MESSAGE frame of the buffer); next_event handles the rest, and its
        # one message, if it is one, goes through the same loop as a batch of one.
        single: tuple[Message, ...] = ()
        try:
            while True:
                for batch in (single, wire.received_messages()):
                    for msg in batch:
                        if not msgr.deliver(self, msg):
                            # Throttled, charged nothing: park this message and stop
                            # reading (the rest of the batch stays in the stream).
                            self._park(msg)
                            return
                        if self.wire is not wire:
                            return  # the dispatcher marked us down or replaced the socket
                        delivered += 1
                        if delivered % _FLUSH_EVERY == 0 and self.session is not None \
                                and self.session.has_outgoing():
                            self._flush()
                            if self.wire is not wire:
                                return
                        if (self._write_blocked or (self.session is not None and
                                                    self.session.queued_count > self._queue_limit)) \
                                and self._hold_input_for_output():
                            # Replies pile up faster than the peer reads them: write first.
                            self.schedule_flush()
                            return
                ev = wire.next_event()
                if ev is NEED_DATA:
                    break
                if type(ev) is MessageReceived:
                    single = (ev.message,)
                    continue
                single = ()
                self._handle_event(ev)
                if self.wire is not wire:
                    return
        except ProtocolError as err:
            msgr.stats["protocol_errors"] += 1
            msgr.stats[f"protocol_error_{err.code}"] += 1
            self._send_last_words()
            self.fault(f"protocol error: {err.reason}",
                        unretryable=err.code if self.outgoing and err.code in UNRETRYABLE
                        else None)
            return
        if wire.has_data_to_send() or (self.session is not None and self.session.ack_pending):
            self.schedule_flush()

    def _park(self, msg: Message) -> None:
        """Throttled: hold one decoded message and stop reading until a release."""
        self._throttled = True
        self._parked = msg
        self._set_reading(False)
        self.msgr.throttle_wait(self._unthrottle)

    def _unthrottle(self) -> None:
        if not self._throttled:
            return
        msg = self._parked
        assert msg is not None
        self._throttled = False
        self._parked = None
        wire = self.wire
        if not self.msgr.deliver(self, msg):
            self._throttled = True  # still full (nothing was dispatched): wait again
            self._parked = msg
            self.msgr.throttle_wait(self._unthrottle)
            return
        if self.wire is wire and wire is not None:
            self._set_reading(True)
            self._process()

    def _handle_event(self, ev: object) -> None:
        msgr = self.msgr
        if isinstance(ev, Ready):
            self._on_ready(ev)
        elif isinstance(ev, IdentRequest):
            msgr.handle_ident(self, ev)
        elif isinstance(ev, ReconnectRequest):
            msgr.handle_reconnect(self, ev)
        elif isinstance(ev, ResetReceived):
            msgr.stats["remote_resets"] += 1
            msgr.dispatch_remote_reset(self)
        elif isinstance(ev, RetryReceived):
            msgr.stats["retries"] += 1
        elif isinstance(ev, WaitReceived):
            self._wait_received = True
            self.fault("peer asked us to wait (connection race)")
        elif isinstance(ev, KeepaliveReceived):
            self.schedule_flush()
        elif isinstance(ev, KeepaliveAckReceived):
            self.last_keepalive_ack = ev.stamp

    def _on_ready(self, ev: Ready) -> None:
        self.fire(ConnEvent.READY)
        self.peer_type = ev.peer_type
        if ev.peer_addrs:
            self.peer_addrs = ev.peer_addrs
        if ev.unnamed_target is not None:
            # identity check "record": the server is reached through a forwarder
            self.msgr.stats["ident_recorded"] += 1
            if not self._was_ready:
                log.info("%s identifies as %s (recorded; dialled through a forwarder?)",
                         self.peer_addr, ", ".join(f"{a.host}:{a.port}" for a in ev.peer_addrs))
        self.backoff = 0.0
        self._wait_received = False
        self._logged_failure = None
        first = not self._was_ready
        self._was_ready = True
        if self.outgoing:
            self.msgr.stats["connects" if first else "reconnects"] += 1
            self.msgr.dispatch_connect(self)
        self.schedule_flush()

    def server_ready(self, new_session: bool) -> None:
        """The messenger accepted this server-side connection (SERVER_IDENT or RECONNECT_OK
        queued in the wire)."""
        self.fire(ConnEvent.READY)
        self._was_ready = True
        wire = self.wire
        assert wire is not None
        self.peer_type = wire.peer_type
        self.peer_addrs = wire.peer_addrs
        self.schedule_flush()

    # -- faults ------------------------------------------------------------------------------
    def fault(self, reason: str, *, refused: bool = False,
              unretryable: str | None = None) -> None:
        """Socket-level failure (or a timeout): apply the policy (notes §2.2; the events
        in :mod:`.states`). ``refused``: the connect was refused; ``unretryable``: the
        protocol error code of a handshake failure retrying cannot cure."""
        if self.state is ConnState.CLOSED:
            return
        msgr = self.msgr
        self.faults += 1
        msgr.stats["faults"] += 1
        log.debug("%r fault: %s", self, reason)
        self.last_error = reason
        was_ready = self.state is ConnState.READY
        self._drop_socket()
        if unretryable is not None:
            self._report_unretryable(unretryable, reason)
        if self.policy.lossy:
            self.close(notify=True)
            return
        if self.session is None:
            # A half-accepted server connection that never got a session.
            self.close(notify=False)
            return
        self.session.requeue_sent()
        if refused:
            msgr.dispatch_refused(self)
        if not self.outgoing or self.policy.server:
            self.fire(ConnEvent.STANDBY)
            self.msgr.retain(self)  # accounted, maybe evicted (retention caps)
            return
        if self.policy.standby and not self.session.has_outgoing() and not self._wait_received:
            self.fire(ConnEvent.STANDBY)
            return
        if was_ready and not self._wait_received:
            # Fault after READY: reconnect at once with a bumped connect_seq.
            self.session.connect_seq += 1
            self.backoff = 0.0
            self.start_connect()
            return
        if self.session.server_cookie:
            self.session.connect_seq += 1
        backoff = msgr.config.backoff
        if self._wait_received or unretryable is not None:
            self.backoff = backoff.maximum
        else:
            self.backoff = backoff.next(self.backoff)
        self.fire(ConnEvent.BACKOFF)
        delay = self.backoff * (0.5 + msgr.rng.random())  # jitter
        self._timer = self.center.create_time_event(delay, self._on_backoff)

    def _report_unretryable(self, code: str, reason: str) -> None:
        """Tell the application, count it, and log it once per distinct reason (the
        connection keeps retrying at the backoff maximum, so every retry would repeat it)."""
        msgr = self.msgr
        msgr.stats[f"handshake_failures_{code}"] += 1
        if reason != self._logged_failure:
            self._logged_failure = reason
            log.warning("%s: %s", self.peer_addr, reason)
        retry_in = 0.0 if self.policy.lossy else msgr.config.backoff.maximum
        msgr.dispatch_error(self, HandshakeFailure(code, reason, retry_in))

    def _on_backoff(self) -> None:
        self._timer = None
        if self.state is ConnState.BACKOFF:
            self.start_connect()

    def close(self, *, notify: bool) -> None:
        """Close for good: the session is reset and forgotten; ``notify``: the dispatchers
        hear ms_handle_reset (``mark_down`` and ``expire`` are the two uses by name)."""
        if self.state is ConnState.CLOSED:
            return
        self._cancel_timer()
        self._drop_socket()
        self.fire(ConnEvent.CLOSE)
        if self._throttled:
            self._throttled = False
            self.msgr.throttle_cancel(self._unthrottle)
            self._parked = None
        if self.session is not None:
            self.session.reset()
        self.msgr.unregister(self)
        if notify:
            self.msgr.dispatch_reset(self)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self.center.delete_time_event(self._timer)
            self._timer = None

    def hand_off(self) -> tuple[ConnectedSocket | None, Connection | None]:
        """The socket, the session or both moved elsewhere (a reconnect routed to its
        owner, a socket reused by another session, a migration): give up the socket and
        wire without closing them and close, with no callbacks and no session reset.
        The caller owns what is returned and updates the registry."""
        self._unregister_all()
        sock, wire = self.sock, self.wire
        self.sock = None
        self.wire = None
        if self.state is not ConnState.CLOSED:
            self.fire(ConnEvent.HANDED_OFF)
        return sock, wire

