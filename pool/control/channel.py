"""The supervisor<->worker control channel.

One SOCK_SEQPACKET socketpair per worker (supervisors.md 2.8): a
datagram keeps its boundary and carries its fds with it. Every datagram is a 20-byte
header plus a payload chunk::

    !B kind | B flags | H arg | Q xid | I total | I offset | chunk (<= CHUNK bytes)

What each field means for each kind is :mod:`pool.control.messages`' business; this
module only moves :class:`Envelope` values.

A message whose payload exceeds :data:`CHUNK` (a handed-off session's state may be
~1 MiB, while an AF_UNIX datagram is capped by the sender's SO_SNDBUF, ~208 KiB by
default, unix(7)) is split into chunks with the same ``xid``; fds ride on the first
chunk. The receiver reassembles by ``xid`` and delivers when ``offset + len == total``.
A sender enqueues all chunks of a message at once and the socket preserves order, so
chunks of two messages never interleave on one channel.

Handoffs are acknowledged (Node's RoundRobinHandle, supervisors.md 2.8): the sender keeps
its fd until the ack. A receiver that cannot take the fds (MSG_CTRUNC at RLIMIT_NOFILE)
still knows the ``xid`` from a MSG_PEEK of the header and NAKs it.
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transport import fdpass
from transport.errors import FdPassError
from transport.event_center import READABLE, WRITABLE, EventCenter

from .messages import TRUNCATED, ControlMessage, Envelope, Kind

__all__ = ["CHUNK", "HEADER", "Channel", "Envelope", "Kind"]

HEADER = struct.Struct("!BBHQII")
CHUNK = 32 * 1024
MAX_MESSAGE = 4 * 1024 * 1024  # reassembly cap: a peer cannot make us buffer more
MAX_FDS = 4
_KINDS = frozenset(int(k) for k in Kind)


@dataclass
class _Partial:
    kind: int
    flags: int
    arg: int
    total: int
    data: bytearray
    fds: list[int]


class Channel:
    """One end of a control channel, driven by ``center``.

    ``on_message(msg)`` gets every complete message (it owns ``msg.fds``);
    ``on_close(reason)`` runs once, at EOF or on a broken socket. A message whose fds
    could not be received is reported as ``on_message`` with ``fds == []`` and
    ``arg == 0xFFFF`` so the owner can NAK it.
    """

    TRUNCATED = TRUNCATED

    def __init__(self, center: EventCenter, sock: socket.socket,
                 on_message: Callable[[Envelope], None], on_close: Callable[[str], None]) -> None:
        sock.setblocking(False)
        self.center = center
        self.sock = sock
        self.fd = sock.fileno()
        self.on_message = on_message
        self.on_close = on_close
        self._out: deque[tuple[bytes, list[int], list[int]]] = deque()  # data, fds, fds to close after
        self._partial: dict[int, _Partial] = {}
        self.closed = False
        self.truncated = 0
        center.create_file_event(self.fd, READABLE, self._on_read)

    # -- sending -----------------------------------------------------------------------

    def send(self, kind: Kind, xid: int = 0, arg: int = 0, payload: bytes = b"",
             fds: Sequence[int] = (), close_after: Sequence[int] = (), flags: int = 0) -> None:
        """Queue one message. ``close_after`` fds are closed once it left this process."""
        if self.closed:
            for fd in close_after:
                os.close(fd)
            return
        total = len(payload)
        offset = 0
        first = True
        while first or offset < total:
            chunk = payload[offset:offset + CHUNK]
            data = HEADER.pack(int(kind), flags, arg, xid, total, offset) + chunk
            self._out.append((data, list(fds) if first else [], list(close_after) if first else []))
            offset += len(chunk)
            first = False
        self.flush()

    def post(self, msg: ControlMessage, close_after: Sequence[int] = ()) -> None:
        """Queue one typed message (see :meth:`send`)."""
        env = msg.envelope()
        self.send(env.kind, env.xid, env.arg, env.payload, env.fds, close_after, env.flags)

    def flush(self) -> None:
        while self._out:
            data, fds, after = self._out[0]
            try:
                fdpass.send_fds(self.sock, data, fds)
            except (BlockingIOError, InterruptedError):
                self.center.create_file_event(self.fd, WRITABLE, self._on_write)
                return
            except OSError as exc:
                self._broken(f"send failed: {exc}")
                return
            self._out.popleft()
            for fd in after:
                os.close(fd)
        self.center.delete_file_event(self.fd, WRITABLE)

    def _on_write(self, _fd: int) -> None:
        self.flush()

    # -- receiving ---------------------------------------------------------------------

    def _on_read(self, _fd: int) -> None:
        self.read_available(limit=64)

    def read_available(self, limit: int = 1 << 30) -> None:
        """Handle up to ``limit`` datagrams already queued (also used just before close,
        so a worker's last words, e.g. a CONN_ACK, are not lost)."""
        for _ in range(limit):
            if self.closed:
                return
            try:
                head = self.sock.recv(HEADER.size, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._broken(f"recv failed: {exc}")
                return
            if not head:
                self._broken("EOF")
                return
            try:
                data, fds = fdpass.recv_fds(self.sock, HEADER.size + CHUNK, MAX_FDS)
            except (BlockingIOError, InterruptedError):
                return
            except FdPassError:
                # The fds were closed by recv_fds; the header (peeked) still names the
                # message, so the owner can NAK it and the sender retries elsewhere.
                self.truncated += 1
                if len(head) == HEADER.size:
                    kind, _fl, _arg, xid, _tot, _off = HEADER.unpack(head)
                    self._deliver(Envelope(Kind(kind), self.TRUNCATED, xid, b"", []))
                continue
            except OSError as exc:
                self._broken(f"recv failed: {exc}")
                return
            if len(data) < HEADER.size:
                for fd in fds:
                    os.close(fd)
                self._broken(f"short datagram of {len(data)} bytes")
                return
            kind, flags, arg, xid, total, offset = HEADER.unpack_from(data)
            chunk = data[HEADER.size:]
            if total > MAX_MESSAGE or kind not in _KINDS:
                for fd in fds:
                    os.close(fd)
                self._broken(f"bad message kind={kind} total={total}")
                return
            if offset == 0 and len(chunk) == total:
                self._deliver(Envelope(Kind(kind), arg, xid, chunk, fds, flags))
                continue
            part = self._partial.get(xid)
            if part is None:
                if offset != 0:
                    for fd in fds:
                        os.close(fd)
                    continue  # the start was lost (truncated): it was already NAKed
                part = self._partial[xid] = _Partial(kind, flags, arg, total, bytearray(), [])
            part.data += chunk
            part.fds += fds
            if len(part.data) >= part.total:
                del self._partial[xid]
                self._deliver(Envelope(Kind(part.kind), part.arg, xid, bytes(part.data), part.fds,
                                       part.flags))

    def _deliver(self, msg: Envelope) -> None:
        self.on_message(msg)

    def _broken(self, reason: str) -> None:
        if self.closed:
            return
        self.close()
        self.on_close(reason)

    def close(self) -> None:
        """Stop watching and close the socket; fds still queued or half-received are closed."""
        if self.closed:
            return
        self.closed = True
        self.center.delete_file_event(self.fd, READABLE | WRITABLE)
        for _data, _fds, after in self._out:
            for fd in after:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._out.clear()
        for part in self._partial.values():
            for fd in part.fds:
                os.close(fd)
        self._partial.clear()
        self.sock.close()
