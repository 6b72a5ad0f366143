"""The socket half of an AsyncConnection: file events, the read loop, output, flushing.

:class:`SocketIO` moves bytes between a ConnectedSocket and the protocol
:class:`~protocol.connection.Connection` (``wire``) and keeps the I/O bookkeeping; the
session half (handshake events, delivery, faults, lifecycle) is
:class:`~pool.messenger.connection.AsyncConnection`, its one subclass, which supplies
``_process`` (parse what was read) and ``fault`` (apply the policy to a socket failure).

Stack capability, in one place: :func:`reports_write_space_on_read`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protocol.connection import Connection
from protocol.errors import LocalProtocolError
from transport.event_center import READABLE, WRITABLE
from transport.stack import Buffer, ConnectedSocket

from .iovec import Outbox
from .owner import ConnectionOwner
from .states import ConnStateMachine

__all__ = ["SocketIO", "reports_write_space_on_read"]

_READS_PER_WAKEUP = 16


def reports_write_space_on_read(sock: ConnectedSocket) -> bool:
    """The stack capability "send space is reported on the read fd": memif and rdma
    use one eventfd for both directions, so their ``write_fileno()`` is None (the
    readiness contract in :mod:`transport.stack`). Such a connection registers no
    WRITABLE event, flushes when READABLE fires while output waits, and must keep
    reading even while its output backs up (its credit window bounds the peer)."""
    return sock.write_fileno() is None


class SocketIO(ConnStateMachine):
    """Socket, wire and the I/O bookkeeping of one connection (see the module doc).

    Private bookkeeping (none of it is a connection state): ``_reading``/``_writing``
    say which file events are registered; ``_throttled`` (a decoded message is parked
    until the throttles admit it), ``_write_blocked`` (our unsent output is over the
    high-water mark) and ``_paused`` (the owner called ``pause_reading``) are the three
    reasons reading is paused, each released on its own: reading resumes when none holds; ``_flush_scheduled``
    coalesces flush requests into one per loop pass; ``_migrating``: a handoff of this
    session to another worker is in flight, so no I/O meanwhile.
    """

    def __init__(self, msgr: ConnectionOwner[Any], outgoing: bool) -> None:
        super().__init__(outgoing)
        self.msgr = msgr
        self.center = msgr.center
        cfg = msgr.config
        # frozen config, read on the per-message path: copied here once
        self._inject = cfg.inject_socket_failures
        self._high_water = cfg.out_high_water
        self.sock: ConnectedSocket | None = None
        self._space_on_read = False           # reports_write_space_on_read(self.sock)
        self.wire: Connection | None = None
        self._out = Outbox()
        self._flush_scheduled = False
        self._reading = False
        self._writing = False
        self._write_fd: int | None = None
        self._read_fd: int | None = None
        self._throttled = False
        self._write_blocked = False
        self._paused = False
        self._migrating = False
        self.last_active = self.center.now()

    # -- what the session half supplies ---------------------------------------------------
    def _process(self) -> None:
        raise NotImplementedError

    def fault(self, reason: str, *, refused: bool = False,
              unretryable: str | None = None) -> None:
        raise NotImplementedError

    # -- public controls ---------------------------------------------------------------------
    @property
    def migrating(self) -> bool:
        """A handoff of this session to another worker is in flight (no I/O meanwhile)."""
        return self._migrating

    def begin_migration(self) -> None:
        self._migrating = True

    def end_migration(self) -> None:
        self._migrating = False

    def pause_reading(self) -> None:
        """Stop reading the socket until ``resume_reading``; frames already read are
        still delivered. Independent of the throttle and write-backpressure pauses: their
        release does not resume a paused connection, nor does this resume theirs."""
        self._paused = True
        self._set_reading(False)

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self._set_reading(True)
        # A stack whose read fd stayed registered (write space) may not fire again for
        # bytes that arrived while paused: look once.
        self.center.call_soon(self._read_now)

    @property
    def reading_paused(self) -> bool:
        """True while any reason (``pause_reading``, throttle, write backpressure) holds."""
        return self._paused or self._throttled or self._write_blocked

    def _read_now(self) -> None:
        if self.sock is not None and not self.reading_paused:
            self._on_readable(self.sock.fileno())

    # -- attaching a socket ------------------------------------------------------------------
    def _attach(self, sock: ConnectedSocket) -> None:
        self.sock = sock
        self._space_on_read = reports_write_space_on_read(sock)

    def _start_io(self) -> None:
        sock = self.sock
        assert sock is not None
        self._out.clear()
        fd = sock.fileno()
        self._read_fd = fd
        self._reading = False
        self._set_reading(True)  # unless a pause reason still holds
        self.last_active = self.center.now()
        self.schedule_flush()
        # Bytes may already sit in the decoder (a handed-off socket): parse them now.
        self.center.call_soon(self._process)

    # -- reading ---------------------------------------------------------------------------
    def _on_readable(self, _fd: int) -> None:
        sock, wire = self.sock, self.wire
        if sock is None or wire is None or self._migrating:
            return
        if self._writing and self._space_on_read:
            self._flush()  # "send space is back" arrives on this same fd
            if self.sock is not sock:
                return
        if self._throttled or self._paused:
            return
        msgr = self.msgr
        inject = self._inject
        for _ in range(_READS_PER_WAKEUP):
            buf = wire.get_buffer()
            if inject and msgr.rng.randrange(inject) == 0:
                msgr.stats["injected_failures"] += 1
                sock.shutdown()
            try:
                n = sock.read_into(buf)
            except BlockingIOError:
                return
            except OSError as err:
                msgr.count_socket_error(err)
                self.fault(f"read failed: {err.strerror or err}")
                return
            if n == 0:
                msgr.stats["eof"] += 1
                self.fault("peer closed the connection")
                return
            wire.buffer_updated(n)
            msgr.bytes_in += n
            self.last_active = self.center.now()
            # Parse each read before the next: once the lent tail is full, the next
            # get_buffer would otherwise move every byte not yet parsed into a fresh
            # chunk (with a backlog, a copy of up to a chunk per read).
            self._process()
            if (n < len(buf) or self.sock is not sock or self.wire is not wire
                    or self.reading_paused or self._migrating):
                return

    def _set_reading(self, on: bool) -> None:
        """Register READABLE when ``on`` and no pause reason holds. A stack that reports
        write space on its read fd (memif, rdma) keeps it registered whatever holds, or a
        paused connection's output would stall; ``_on_readable`` then skips the read."""
        if self.sock is None:
            return
        on = (on and not self.reading_paused) or self._space_on_read
        if on == self._reading:
            return
        self._reading = on
        fd = self.sock.fileno()
        if on:
            self.center.create_file_event(fd, READABLE, self._on_readable)
        else:
            self.center.delete_file_event(fd, READABLE)

    # -- writing ---------------------------------------------------------------------------
    def schedule_flush(self) -> None:
        """Flush once from the loop, soon (requests coalesce until then)."""
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
        if sock is None or wire is None or self._migrating:
            return
        msgr = self.msgr
        before = wire.messages_out
        try:
            wire.write_messages()
        except LocalProtocolError as err:
            # Queued before the peer was known (e.g. an asyncmsgr message for what turned
            # out to be a Ceph daemon): nothing of it was written; the policy decides.
            msgr.stats[f"local_error_{err.code}"] += 1
            self.fault(f"cannot send: {err.reason}")
            return
        msgr.msgs_out += wire.messages_out - before
        new = wire.data_to_send()
        outbox = self._out
        if new:
            outbox.add(new)
        out = outbox.bufs
        if not out:
            return
        inject = self._inject
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
            self.fault(f"write failed: {err.strerror or err}")
            return
        if total:
            msgr.bytes_out += total
            self.last_active = self.center.now()
        self._want_write(bool(out))
        # Send-side bound: a peer that does not read what we write must not make us
        # buffer without limit. Stop reading its requests until the backlog drains.
        if outbox.nbytes > self._high_water:
            self._hold_input_for_output()
        elif self._write_blocked and outbox.nbytes <= self._high_water // 2:
            self._write_blocked = False
            if not self._throttled:
                self._set_reading(True)
                self.center.call_soon(self._process)

    def _hold_input_for_output(self) -> bool:
        """Stop reading this peer until our unsent output drains (``_flush`` resumes).

        Not for stacks that report write space on the read fd: they must keep reading.
        """
        if self.sock is None or self._space_on_read:
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
        if self._space_on_read:
            return  # the stack wakes READABLE when space frees; _on_readable flushes
        fd = self.sock.write_fileno()
        assert fd is not None
        self._write_fd = fd if on else None
        if on:
            self.center.create_file_event(fd, WRITABLE, lambda _fd: self._flush())
        else:
            self.center.delete_file_event(fd, WRITABLE)

    # -- letting go ------------------------------------------------------------------------
    def fault_for_test(self) -> None:
        """Shut the socket down as an injected failure would."""
        if self.sock is not None:
            self.sock.shutdown()

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

    def pending_output(self) -> Sequence[Buffer]:
        return self._out.bufs
