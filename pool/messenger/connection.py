"""AsyncConnection: a protocol session glued to a ConnectedSocket on one EventCenter.

One object per peer session. Sockets come and go beneath it (faults, reconnects, a
replacing socket from the peer); the :class:`~protocol.session.Session` with its queues
and sequence numbers stays. Everything runs on the owning EventCenter's thread.

States::

    CONNECTING ─▶ HANDSHAKE ─▶ READY ─┬─▶ (fault) ─▶ BACKOFF ─▶ CONNECTING   (client)
    ACCEPTING ──▶ HANDSHAKE ─▶ READY ─┤          └─▶ STANDBY                  (server / idle)
                                      └─▶ CLOSED  (mark_down, lossy fault, shutdown)

Faults follow Ceph's ``ProtocolV2::_fault`` (notes §2.2): lossy → close and
``ms_handle_reset``; otherwise requeue unacknowledged messages, then reconnect at once if
the session had been READY, after a doubling back-off if it was still connecting, or go
to STANDBY (server policy; standby policy with nothing queued).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from protocol.connection import (
    NEED_DATA, Connection, IdentRequest, KeepaliveAckReceived, KeepaliveReceived,
    MessageReceived, Ready, ReconnectRequest, ResetReceived, RetryReceived, Role,
    WaitReceived,
)
from protocol.control import EntityAddr
from protocol.errors import LocalProtocolError, ProtocolError
from protocol.message import Message, check_outgoing
from protocol.policy import Policy
from protocol.session import Session, SessionView
from transport.event_center import READABLE, WRITABLE
from transport.stack import Address, Buffer, ConnectedSocket

from .dispatcher import UNRETRYABLE, HandshakeFailure
from .iovec import Outbox
from .states import ConnState

if TYPE_CHECKING:
    from .messenger import Messenger

__all__ = ["AsyncConnection", "ConnState"]

log = logging.getLogger("pool.messenger.connection")

_READS_PER_WAKEUP = 16
#: While a large batch of received messages is dispatched, replies queued so far are
#: sent every this many messages, so the peer works on them while we go on: without
#: it a full window crosses as one batch each way and the two sides take turns.
#: Measured at window 128, 64 B echo, two processes: TCP 42k -> 90k req/s, memif
#: poll mode 36k -> 97k (BENCHMARKS.md has the runs).
_FLUSH_EVERY = 32


class AsyncConnection:
    """A session with a peer and, at times, a socket to it."""

    def __init__(self, msgr: Messenger, policy: Policy, *, peer_addr: Address | None,
                 outgoing: bool) -> None:
        self.msgr = msgr
        self.center = msgr.center
        self.policy = policy
        self.peer_addr = peer_addr            # where to dial (outgoing only)
        self.outgoing = outgoing
        self.session = Session(policy) if outgoing else None
        self.state = ConnState.CONNECTING if outgoing else ConnState.ACCEPTING
        self.sock: ConnectedSocket | None = None
        self.wire: Connection | None = None
        self.key: str | None = None           # registry key (peer identity)
        self.peer_type = 0
        self.peer_addrs: tuple[EntityAddr, ...] = ()
        self.replacing = False
        self.backoff = 0.0
        self._was_ready = False
        self._wait_received = False
        self._out = Outbox()
        self._flush_scheduled = False
        self._reading = False
        self._writing = False
        self._write_fd: int | None = None
        self._read_fd: int | None = None
        self._timer: int | None = None
        self._throttled = False
        self._write_blocked = False
        self._parked: Message | None = None
        self.connect_started = msgr.center.now()
        self.last_active = self.connect_started
        self.last_keepalive_ack: tuple[int, int] | None = None
        self.faults = 0
        #: the reason of the latest fault (connect refused, protocol error, EOF), in words
        self.last_error: str | None = None
        self._logged_failure: str | None = None
        #: a handoff of this session to another worker is in flight: no I/O meanwhile
        self.migrating = False
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
            self._schedule_flush()
        elif self.state is ConnState.STANDBY and not self.policy.server:
            self._start_connect()
        elif self.state is ConnState.STANDBY and not self.outgoing:
            self.msgr.retain_more(self, msg)  # waits for an absent client: it counts

    def send_keepalive(self) -> None:
        if self.wire is not None and self.state is ConnState.READY:
            now = self.center.now()
            self.wire.send_keepalive((int(now), int((now % 1) * 1e9)))
            self._schedule_flush()

    def is_connected(self) -> bool:
        return self.state is ConnState.READY

    def mark_down(self) -> None:
        """Close the connection and forget the session; no callbacks for the caller."""
        self._stop(notify=False)

    def expire(self) -> None:
        """Forget a session the server will not keep (standby timeout, retention caps):
        the dispatcher hears ms_handle_reset, the client SESSION_RESET if it returns."""
        self._stop(notify=True)

    @property
    def peer_entity(self) -> str:
        return str(self.peer_addrs[0]) if self.peer_addrs else str(self.peer_addr)

    def view(self) -> SessionView:
        s = self.session
        return SessionView(
            closed=self.state is ConnState.CLOSED or s is None,
            replacing=self.replacing,
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
    def _start_connect(self) -> None:
        assert self.outgoing and self.peer_addr is not None
        self._cancel_timer()
        self._drop_socket()
        self.state = ConnState.CONNECTING
        self.connect_started = self.center.now()
        try:
            sock = self.msgr.stack.connect(self.peer_addr, self.msgr.socket_options)
        except OSError as err:
            self.msgr.count_socket_error(err)
            self._fault(f"connect to {self.peer_addr} failed: {err}", refused=True)
            return
        self.sock = sock
        fd = sock.write_fileno()
        if fd is None:
            fd = sock.fileno()
            self.center.create_file_event(fd, READABLE, self._on_connect_ready)
            self._read_fd = fd
        else:
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
            self._fault(f"connect to {self.peer_addr} failed: {err.strerror or err}",
                        refused=refused)
            return
        if st == 0:
            return
        self._unregister_all()
        assert self.session is not None
        self.wire = Connection(Role.CLIENT, self.msgr.proto_config, self.session,
                               target_addr=self.msgr.target_entity_addr(self.peer_addr))
        self.state = ConnState.HANDSHAKE
        self._start_io()

    # -- accepting -------------------------------------------------------------------------
    def accept(self, sock: ConnectedSocket, wire: Connection) -> None:
        """Start serving an accepted socket (handshake first)."""
        self.sock = sock
        self.wire = wire
        self.state = ConnState.HANDSHAKE
        self._start_io()

    def replace_socket(self, sock: ConnectedSocket, wire: Connection) -> None:
        """Ceph's ``reuse_connection``: take over a newer socket for this session."""
        self._cancel_timer()
        if self.session is not None and not self.policy.lossy:
            self.session.requeue_sent()
        self._drop_socket()
        self.sock = sock
        self.wire = wire
        self.state = ConnState.HANDSHAKE
        self.replacing = False
        self._start_io()

    def _start_io(self) -> None:
        sock = self.sock
        assert sock is not None
        self._out.clear()
        fd = sock.fileno()
        self._read_fd = fd
        self._reading = True
        self.center.create_file_event(fd, READABLE, self._on_readable)
        self.last_active = self.center.now()
        self._schedule_flush()
        # Bytes may already sit in the decoder (a handed-off socket): parse them now.
        self.center.call_soon(self._process)

    # -- reading ---------------------------------------------------------------------------
    def _on_readable(self, _fd: int) -> None:
        sock, wire = self.sock, self.wire
        if sock is None or wire is None or self.migrating:
            return
        if self._writing and sock.write_fileno() is None:
            # memif and rdma signal "send space is back" through this same fd.
            self._flush()
            if self.sock is not sock:
                return
        if self._throttled:
            return
        msgr = self.msgr
        inject = msgr.inject_socket_failures
        nread = 0
        for _ in range(_READS_PER_WAKEUP):
            buf = wire.get_buffer()
            if inject and msgr.rng.randrange(inject) == 0:
                msgr.stats["injected_failures"] += 1
                sock.shutdown()
            try:
                n = sock.read_into(buf)
            except BlockingIOError:
                break
            except OSError as err:
                msgr.count_socket_error(err)
                self._fault(f"read failed: {err.strerror or err}")
                return
            if n == 0:
                msgr.stats["eof"] += 1
                self._fault("peer closed the connection")
                return
            wire.buffer_updated(n)
            nread += n
            if n < len(buf):
                break
        if nread:
            msgr.bytes_in += nread
            self.last_active = self.center.now()
            self._process()

    def _process(self) -> None:
        """Handle every complete frame already received (until throttled)."""
        wire = self.wire
        if wire is None or self._throttled or self._write_blocked:
            return
        msgr = self.msgr
        delivered = 0
        try:
            while True:
                ev = wire.next_event()
                if ev is NEED_DATA:
                    break
                if type(ev) is MessageReceived:
                    msg = ev.message
                    size = len(msg.data) + 64
                    if not msgr.throttle_take(size):
                        # Charged nothing; park this message and stop reading.
                        self._park(msg)
                        return
                    msgr.deliver(self, msg, size)
                    if self.wire is not wire:
                        return  # the dispatcher marked us down or replaced the socket
                    delivered += 1
                    if delivered % _FLUSH_EVERY == 0 and self.session is not None \
                            and self.session.has_outgoing():
                        self._flush()
                        if self.wire is not wire:
                            return
                    if (self._write_blocked or (self.session is not None and
                                                self.session.queued_count > msgr.out_queue_limit)) \
                            and self._hold_input_for_output():
                        # Replies pile up faster than the peer reads them: write first.
                        self._schedule_flush()
                        return
                    continue
                self._handle_event(ev)
                if self.wire is not wire:
                    return
        except ProtocolError as err:
            msgr.stats["protocol_errors"] += 1
            msgr.stats[f"protocol_error_{err.code}"] += 1
            self._send_last_words()
            self._fault(f"protocol error: {err.reason}",
                        unretryable=err.code if self.outgoing and err.code in UNRETRYABLE
                        else None)
            return
        if wire.has_data_to_send() or (self.session is not None and self.session.ack_pending):
            self._schedule_flush()

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
        size = len(msg.data) + 64
        if not self.msgr.throttle_take(size):
            self.msgr.throttle_wait(self._unthrottle)
            return
        self._throttled = False
        self._parked = None
        wire = self.wire
        self.msgr.deliver(self, msg, size)
        if self.wire is wire and wire is not None:
            self._set_reading(True)
            self._process()

    def _set_reading(self, on: bool) -> None:
        if self.sock is None or on == self._reading:
            return
        self._reading = on
        fd = self.sock.fileno()
        if on:
            self.center.create_file_event(fd, READABLE, self._on_readable)
        else:
            self.center.delete_file_event(fd, READABLE)

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
            self._fault("peer asked us to wait (connection race)")
        elif isinstance(ev, KeepaliveReceived):
            self._schedule_flush()
        elif isinstance(ev, KeepaliveAckReceived):
            self.last_keepalive_ack = ev.stamp

    def _on_ready(self, ev: Ready) -> None:
        self.state = ConnState.READY
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
        self._schedule_flush()

    def server_ready(self, new_session: bool) -> None:
        """The messenger accepted this server-side connection (SERVER_IDENT or RECONNECT_OK
        queued in the wire)."""
        self.state = ConnState.READY
        self._was_ready = True
        wire = self.wire
        assert wire is not None
        self.peer_type = wire.peer_type
        self.peer_addrs = wire.peer_addrs
        self._schedule_flush()

    # -- writing ---------------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.center.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        """Encode what the session has queued and send as much as the socket takes.
        Also called directly (mid-batch, on send space); a flush already scheduled
        still runs once, for what is queued by then."""
        sock, wire = self.sock, self.wire
        if sock is None or wire is None or self.migrating:
            return
        msgr = self.msgr
        before = wire.messages_out
        try:
            wire.write_messages()
        except LocalProtocolError as err:
            # Queued before the peer was known (e.g. an asyncmsgr message for what turned
            # out to be a Ceph daemon): nothing of it was written; the policy decides.
            msgr.stats[f"local_error_{err.code}"] += 1
            self._fault(f"cannot send: {err.reason}")
            return
        msgr.msgs_out += wire.messages_out - before
        new = wire.data_to_send()
        outbox = self._out
        if new:
            outbox.add(new)
        out = outbox.bufs
        if not out:
            return
        inject = msgr.inject_socket_failures
        if inject and msgr.rng.randrange(inject) == 0:
            msgr.stats["injected_failures"] += 1
            sock.shutdown()
        total = 0
        try:
            while out:
                n = sock.send(out)
                total += n
                outbox.consume(n)
        except BlockingIOError:
            pass
        except OSError as err:
            msgr.count_socket_error(err)
            self._fault(f"write failed: {err.strerror or err}")
            return
        if total:
            msgr.bytes_out += total
            self.last_active = self.center.now()
        self._want_write(bool(out))
        # Send-side bound: a peer that does not read what we write must not make us
        # buffer without limit. Stop reading its requests until the backlog drains.
        if outbox.nbytes > msgr.out_high_water:
            self._hold_input_for_output()
        elif self._write_blocked and outbox.nbytes <= msgr.out_high_water // 2:
            self._write_blocked = False
            if not self._throttled:
                self._set_reading(True)
                self.center.call_soon(self._process)

    def _hold_input_for_output(self) -> bool:
        """Stop reading this peer until our unsent output drains (``_flush`` resumes).

        Not for stacks without a write fd (memif, rdma): they report send space through
        the read fd, so they must keep reading; their credit window bounds the peer.
        """
        sock = self.sock
        if sock is None or sock.write_fileno() is None:
            return False
        if not self._write_blocked:
            self._write_blocked = True
            self.msgr.stats["write_backpressure"] += 1
        self._set_reading(False)
        return True

    def _send_last_words(self) -> None:
        """Best effort, non-blocking: put what the wire already produced (e.g. an
        AUTH_BAD_METHOD saying why) on the socket before it is closed."""
        sock, wire = self.sock, self.wire
        if sock is None or wire is None or not wire.has_data_to_send():
            return
        try:
            sock.send(self._out.bufs + wire.data_to_send())
        except OSError:
            pass

    def _want_write(self, on: bool) -> None:
        if on == self._writing or self.sock is None:
            return
        self._writing = on
        fd = self.sock.write_fileno()
        if fd is None:
            return  # the stack wakes READABLE when space frees; _on_readable flushes
        self._write_fd = fd if on else None
        if on:
            self.center.create_file_event(fd, WRITABLE, lambda _fd: self._flush())
        else:
            self.center.delete_file_event(fd, WRITABLE)

    # -- faults ------------------------------------------------------------------------------
    def _fault(self, reason: str, *, refused: bool = False,
               unretryable: str | None = None) -> None:
        """Socket-level failure: apply the policy (notes §2.2). ``unretryable`` is the
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
            self._stop(notify=True)
            return
        if self.session is None:
            # A half-accepted server connection that never got a session.
            self._stop(notify=False)
            return
        self.session.requeue_sent()
        if refused:
            msgr.dispatch_refused(self)
        if not self.outgoing or self.policy.server:
            self.state = ConnState.STANDBY
            self.msgr.retain(self)  # accounted, maybe evicted (retention caps)
            return
        if self.policy.standby and not self.session.has_outgoing() and not self._wait_received:
            self.state = ConnState.STANDBY
            return
        if was_ready and not self._wait_received:
            # Fault after READY: reconnect at once with a bumped connect_seq.
            self.session.connect_seq += 1
            self.backoff = 0.0
            self._start_connect()
            return
        if self.session.server_cookie:
            self.session.connect_seq += 1
        if self._wait_received or unretryable is not None:
            self.backoff = msgr.backoff.maximum
        else:
            self.backoff = msgr.backoff.next(self.backoff)
        self.state = ConnState.BACKOFF
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
        retry_in = 0.0 if self.policy.lossy else msgr.backoff.maximum
        msgr.dispatch_error(self, HandshakeFailure(code, reason, retry_in))

    def _on_backoff(self) -> None:
        self._timer = None
        if self.state is ConnState.BACKOFF:
            self._start_connect()

    def fault_for_test(self) -> None:
        """Shut the socket down as an injected failure would."""
        if self.sock is not None:
            self.sock.shutdown()

    def _stop(self, *, notify: bool) -> None:
        if self.state is ConnState.CLOSED:
            return
        self._cancel_timer()
        self._drop_socket()
        self.state = ConnState.CLOSED
        if self._throttled:
            self._throttled = False
            self.msgr.throttle_discard_waiter(self._unthrottle)
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

    def _unregister_all(self) -> None:
        if self._read_fd is not None:
            self.center.delete_file_event(self._read_fd, READABLE)
            self._read_fd = None
        if self._write_fd is not None:
            self.center.delete_file_event(self._write_fd, WRITABLE)
            self._write_fd = None
        self._reading = False
        self._writing = False

    def _drop_socket(self) -> None:
        self._unregister_all()
        if self.wire is not None:
            self.wire.close()
            self.wire = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._out.clear()

    def detach_socket(self) -> tuple[ConnectedSocket | None, Connection | None]:
        """Give up the socket and wire without closing them (handoff, reuse)."""
        self._unregister_all()
        sock, wire = self.sock, self.wire
        self.sock = None
        self.wire = None
        return sock, wire

    def pending_output(self) -> Sequence[Buffer]:
        return self._out.bufs
