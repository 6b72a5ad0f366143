"""The supervisor<->worker control channel, and the Processor's connection assignment.

**Control channel.** One SOCK_SEQPACKET socketpair per worker (supervisors.md 2.8): a
datagram keeps its boundary and carries its fds with it. Every datagram is a 20-byte
header plus a payload chunk::

    !B kind | B flags | H arg | Q xid | I total | I offset | chunk (<= CHUNK bytes)

A message whose payload exceeds :data:`CHUNK` (a handed-off session's state may be
~1 MiB, while an AF_UNIX datagram is capped by the sender's SO_SNDBUF, ~208 KiB by
default, unix(7)) is split into chunks with the same ``xid``; fds ride on the first
chunk. The receiver reassembles by ``xid`` and delivers when ``offset + len == total``.
A sender enqueues all chunks of a message at once and the socket preserves order, so
chunks of two messages never interleave on one channel.

Handoffs are acknowledged (Node's RoundRobinHandle, supervisors.md 2.8): the sender keeps
its fd until the ack. A receiver that cannot take the fds (MSG_CTRUNC at RLIMIT_NOFILE)
still knows the ``xid`` from a MSG_PEEK of the header and NAKs it.

**Processor.** In ``processor`` accept mode the supervisor accepts and gives each fd to
the ACCEPTING worker with the fewest live connections (control page count plus the
handoffs already in flight to it, Seastar's ``connection_distribution``); on NAK or death
the next one is tried. With no accepting worker the fd waits in a bounded backlog and
the accept loop pauses, so the kernel's listen queue, not our memory, holds the rest.
"""

from __future__ import annotations

import enum
import json
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from transport import fdpass
from transport.errors import FdPassError
from transport.event_center import READABLE, WRITABLE, EventCenter
from transport.posix import PosixServerSocket, PosixStack
from transport.stack import SocketOptions

__all__ = ["CHUNK", "HEADER", "Channel", "Kind", "Message", "Processor"]

HEADER = struct.Struct("!BBHQII")
CHUNK = 32 * 1024
MAX_MESSAGE = 4 * 1024 * 1024  # reassembly cap: a peer cannot make us buffer more
MAX_FDS = 4


class Kind(enum.IntEnum):
    READY = 1  # W->S  the worker's loop and app are up
    START = 2  # S->W  start taking connections (reuseport: the slot's listener fd)
    STARTED = 3  # W->S  it does (the slot becomes ACCEPTING)
    CONN = 4  # S->W  adopt this fd (+ state); xid names the delivery
    CONN_ACK = 5  # W->S  arg=1 adopted, 0 NAK
    HANDOFF = 6  # W->S  relay this fd (+ state) to slot ``arg``
    HANDOFF_RESULT = 7  # S->W  arg=1 the target adopted it, 0 it did not
    DRAIN = 8  # S->W  retire: migrate connections, then exit
    LISTEN = 9  # S->W  also poll listener ``xid`` (fd attached)
    UNLISTEN = 10  # S->W  stop polling listener ``xid``
    DRAINED = 11  # W->S  owns nothing any more, exiting
    RING_ADD = 12  # S->W  attach ring (JSON descriptor; fds: bell, space eventfds)
    RING_DEL = 13  # S->W  worker ``arg`` exited: xid=1 retired (drain its ring), 0 crashed
    PEERS = 14  # S->W  the peer map (JSON: version, accepting slots, previous, lost)


@dataclass
class Message:
    kind: Kind
    arg: int
    xid: int
    payload: bytes
    fds: list[int] = field(default_factory=list)


@dataclass
class _Partial:
    kind: int
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

    TRUNCATED = 0xFFFF

    def __init__(self, center: EventCenter, sock: socket.socket,
                 on_message: Callable[[Message], None], on_close: Callable[[str], None]) -> None:
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
             fds: Sequence[int] = (), close_after: Sequence[int] = ()) -> None:
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
            data = HEADER.pack(int(kind), 0, arg, xid, total, offset) + chunk
            self._out.append((data, list(fds) if first else [], list(close_after) if first else []))
            offset += len(chunk)
            first = False
        self.flush()

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
                    self._deliver(Message(Kind(kind), self.TRUNCATED, xid, b"", []))
                continue
            except OSError as exc:
                self._broken(f"recv failed: {exc}")
                return
            if len(data) < HEADER.size:
                for fd in fds:
                    os.close(fd)
                self._broken(f"short datagram of {len(data)} bytes")
                return
            kind, _flags, arg, xid, total, offset = HEADER.unpack_from(data)
            chunk = data[HEADER.size:]
            if total > MAX_MESSAGE or kind not in Kind._value2member_map_:
                for fd in fds:
                    os.close(fd)
                self._broken(f"bad message kind={kind} total={total}")
                return
            if offset == 0 and len(chunk) == total:
                self._deliver(Message(Kind(kind), arg, xid, chunk, fds))
                continue
            part = self._partial.get(xid)
            if part is None:
                if offset != 0:
                    for fd in fds:
                        os.close(fd)
                    continue  # the start was lost (truncated): it was already NAKed
                part = self._partial[xid] = _Partial(kind, arg, total, bytearray(), [])
            part.data += chunk
            part.fds += fds
            if len(part.data) >= part.total:
                del self._partial[xid]
                self._deliver(Message(Kind(part.kind), part.arg, xid, bytes(part.data), part.fds))

    def _deliver(self, msg: Message) -> None:
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


# -- the Processor's assignment ------------------------------------------------------------

@dataclass
class _Delivery:
    fd: int
    meta: bytes
    tried: set[int]
    on_done: Callable[[int | None], None]


class Processor:
    """Assigns fds to workers: least loaded first, next one on NAK or death.

    ``candidates()`` returns ``{slot: live connection count}`` for ACCEPTING slots;
    ``send(slot, fd, meta, on_result)`` delivers over that slot's channel and later calls
    ``on_result(bool)``. The Processor owns each fd until a worker adopted it.
    """

    def __init__(self, candidates: Callable[[], dict[int, int]],
                 send: Callable[[int, int, bytes, Callable[[bool], None]], None],
                 log: Callable[[str], None], backlog_limit: int = 1024) -> None:
        self.candidates = candidates
        self._send = send
        self.log = log
        self.backlog_limit = backlog_limit
        self.inflight: dict[int, int] = {}
        self.backlog: deque[_Delivery] = deque()
        self.assigned = 0
        self.naks = 0
        self.dropped = 0

    def full(self) -> bool:
        return len(self.backlog) >= self.backlog_limit

    def submit(self, fd: int, meta: bytes = b"", exclude: Sequence[int] = (),
               on_done: Callable[[int | None], None] | None = None) -> None:
        """Give ``fd`` (owned by us from now on) to the least-loaded worker.

        ``on_done(slot)`` reports the adopter, or None when it had to be closed.
        """
        self._try(_Delivery(fd, meta, set(exclude), on_done or (lambda _s: None)))

    def _try(self, d: _Delivery) -> None:
        cands = self.candidates()
        load = {s: n + self.inflight.get(s, 0) for s, n in cands.items() if s not in d.tried}
        if not cands:
            if len(self.backlog) >= self.backlog_limit:
                self._drop(d, "backlog full")
                return
            d.tried.clear()
            self.backlog.append(d)
            return
        if not load:
            self._drop(d, "every accepting worker refused it")
            return
        slot = min(load, key=lambda s: (load[s], s))
        d.tried.add(slot)
        self.inflight[slot] = self.inflight.get(slot, 0) + 1

        def on_result(ok: bool, slot: int = slot, d: _Delivery = d) -> None:
            self.inflight[slot] -= 1
            if ok:
                self.assigned += 1
                os.close(d.fd)
                d.on_done(slot)
            else:
                self.naks += 1
                self._try(d)

        self._send(slot, d.fd, d.meta, on_result)

    def _drop(self, d: _Delivery, why: str) -> None:
        self.dropped += 1
        self.log(f"processor: closing a connection: {why}")
        os.close(d.fd)
        d.on_done(None)

    def kick(self) -> None:
        """Retry the backlog (a worker became ACCEPTING)."""
        if not self.candidates():
            return
        pending, self.backlog = self.backlog, deque()
        for d in pending:
            self._try(d)

    def close(self) -> None:
        for d in self.backlog:
            os.close(d.fd)
        self.backlog.clear()


# -- reuseport: listener slots ---------------------------------------------------------------

class ListenerSlots:
    """reuseport mode: listener ``i`` is made for slot ``i`` and the supervisor keeps its
    own copy of every listener, so a worker's exit is never a listener's last close and
    its queued connections are never reset (supervisors.md 2.1, granian#567).

    A listener nobody polls is worse than a closed one (connections hashed to it hang),
    so whenever a slot stops accepting its listeners go to the surviving accepting
    worker that polls the fewest (``rehome``); when slot ``i`` accepts again it gets
    listener ``i`` back and the interim owner is told to drop it (``on_accepting``).
    ``send(slot, kind, lid, fds)`` writes LISTEN / UNLISTEN to a worker's channel.
    """

    def __init__(self, bind: tuple[str, int], send: Callable[[int, Kind, int, list[int]], None],
                 log: Callable[[str], None]) -> None:
        self.send = send
        self.log = log
        self.listeners: dict[int, PosixServerSocket] = {}
        self.owner: dict[int, int | None] = {}
        first = self._make(0, bind)  # fails fast on EADDRINUSE; learns the port for bind :0
        addr = first.address
        assert isinstance(addr, tuple)
        self.address: tuple[str, int] = (addr[0], addr[1])

    def _make(self, lid: int, bind: tuple[str, int]) -> PosixServerSocket:
        # Identical options for every member of the group: the kernel's migration
        # between listeners with different settings can break applications
        # (Documentation/networking/ip-sysctl.rst, tcp_migrate_req).
        sock = PosixStack().listen(bind, SocketOptions(reuseport=True, backlog=1024))
        self.listeners[lid] = sock
        self.owner[lid] = None
        return sock

    def listener(self, lid: int) -> PosixServerSocket:
        sock = self.listeners.get(lid)
        return sock if sock is not None else self._make(lid, self.address)

    def start_message(self, slot: int) -> tuple[bytes, list[int]]:
        """The START payload for a new worker of ``slot``: its own listener."""
        return json.dumps([slot]).encode(), [self.listener(slot).fileno()]

    def on_accepting(self, slot: int) -> None:
        prev = self.owner.get(slot)
        self.owner[slot] = slot
        if prev is not None and prev != slot:
            self.send(prev, Kind.UNLISTEN, slot, [])  # the new owner polls it now
        for lid, owner in self.owner.items():
            if owner is None:
                self.give(lid, slot)

    def rehome(self, slot: int, survivors: dict[int, int]) -> None:
        """Hand every listener polled by ``slot`` to one of ``survivors`` (accepting)."""
        for lid, owner in list(self.owner.items()):
            if owner != slot:
                continue
            if not survivors:
                self.owner[lid] = None  # orphan until a worker accepts again
                continue
            counts = {s: sum(1 for o in self.owner.values() if o == s) for s in survivors}
            self.give(lid, min(counts, key=lambda s: (counts[s], s)))

    def give(self, lid: int, slot: int) -> None:
        self.owner[lid] = slot
        self.send(slot, Kind.LISTEN, lid, [self.listeners[lid].fileno()])
        self.log(f"listener {lid} handed to slot {slot}")

    def owned_by(self, slot: int) -> list[int]:
        return sorted(lid for lid, o in self.owner.items() if o == slot)

    def close(self) -> None:
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()
        self.owner.clear()
