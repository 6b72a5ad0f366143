"""The memif server side (:class:`MemifListener`): binds the control socket (abstract or
filesystem), sends HELLO on accept, maps what it is given, zeroes head/tail on CONNECT."""

from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import time

from ..errors import ClosedResourceError
from . import wire
from .control import MemifDisconnected, is_abstract, recv_msg, send_msg, sockaddr
from .interface import MemifConfig, MemifInterface, MemifProtocolError
from .ring import Ring

__all__ = ["MemifListener"]


class _ServerHandshake:
    """One accepted control connection until CONNECT (server side of §3.4)."""

    def __init__(self, sock: socket.socket, listener: MemifListener) -> None:
        self.sock = sock
        self.listener = listener
        self.deadline = time.monotonic() + listener.handshake_timeout
        self.init: wire.Init | None = None
        self.region_fds: list[tuple[int, int]] = []  # (fd, size)
        self.rings: list[tuple[wire.AddRing, int]] = []  # (msg, eventfd)
        cfg = listener.config
        send_msg(sock, wire.Hello(cfg.name, wire.VERSION, wire.VERSION, wire.MAX_REGIONS - 1,
                                  cfg.queues - 1, cfg.queues - 1, cfg.log2_ring_size))

    def step(self) -> MemifInterface | None:
        while True:
            try:
                msg, fd = recv_msg(self.sock)
            except BlockingIOError:
                return None
            try:
                done = self._on_message(msg, fd)
            except BaseException:
                if fd is not None and fd not in [f for f, _ in self.region_fds] \
                        and fd not in [e for _, e in self.rings]:
                    os.close(fd)
                raise
            if done is not None:
                return done

    def _fail(self, reason: str) -> MemifProtocolError:
        try:
            send_msg(self.sock, wire.Disconnect(0, reason.encode()))
        except OSError:
            pass
        return MemifProtocolError(errno.EPROTO, reason)

    def _on_message(self, msg: wire.Message, fd: int | None) -> MemifInterface | None:
        cfg = self.listener.config
        if isinstance(msg, wire.Disconnect):
            raise MemifDisconnected(msg.reason.decode(errors="replace"), msg.code)
        if isinstance(msg, wire.Init):
            if self.init is not None:
                raise self._fail("Unexpected message")
            if msg.version != wire.VERSION:
                raise self._fail("Incompatible memif version")
            if self.listener.ids is not None and msg.id not in self.listener.ids:
                raise self._fail("ID not found")
            if cfg.secret and msg.secret != cfg.secret:
                raise self._fail("Incorrect secret" if msg.secret else "Secret required")
            if msg.mode != wire.MODE_ETHERNET:
                raise self._fail("Only ethernet mode supported")
            self.init = msg
            send_msg(self.sock, wire.Ack())
            return None
        if self.init is None:
            raise self._fail("Unexpected message")
        if isinstance(msg, wire.AddRegion):
            if fd is None:
                raise self._fail("Missing region fd")
            if msg.index != len(self.region_fds):
                raise self._fail("Invalid region index")
            self.region_fds.append((fd, msg.size))
            send_msg(self.sock, wire.Ack())
            return None
        if isinstance(msg, wire.AddRing):
            if fd is None:
                raise self._fail("Missing interrupt fd")
            if msg.index >= cfg.queues or msg.log2_ring_size > cfg.log2_ring_size \
                    or any(m.index == msg.index and m.c2s == msg.c2s for m, _ in self.rings):
                raise self._fail("Invalid ring index")
            self.rings.append((msg, fd))
            send_msg(self.sock, wire.Ack())
            return None
        if type(msg) is wire.Connect:
            iface = self._map(msg.if_name)
            send_msg(self.sock, wire.Connected(cfg.name))
            return iface
        raise self._fail("Unexpected message")

    def _map(self, peer_name: bytes) -> MemifInterface:
        cfg = self.listener.config
        c2s = sorted((m for m in self.rings if m[0].c2s), key=lambda x: x[0].index)
        s2c = sorted((m for m in self.rings if not m[0].c2s), key=lambda x: x[0].index)
        nq = len(c2s)
        if nq == 0 or len(s2c) != nq or [m.index for m, _ in c2s] != list(range(nq)) \
                or [m.index for m, _ in s2c] != list(range(nq)):
            raise self._fail("Invalid ring index")
        maps: list[mmap.mmap] = []
        views: list[memoryview] = []
        rings: list[Ring] = []
        try:
            for fd, size in self.region_fds:
                m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                maps.append(m)
                views.append(memoryview(m))
            for msg, efd in c2s + s2c:
                if msg.region >= len(views):
                    raise self._fail("Invalid region index")
                r = Ring(views[msg.region], msg.offset, msg.log2_ring_size, views, efd)
                rings.append(r)
                if r.cookie != wire.COOKIE:
                    raise self._fail("Wrong cookie")
        except BaseException as e:
            for r in rings:
                for v in (r.h16, r.h32, r.desc):
                    v.release()
            for v in views:
                v.release()
            for m in maps:
                m.close()
            if isinstance(e, (ValueError, OSError)) and not isinstance(e, MemifProtocolError):
                raise self._fail(f"Invalid ring or region: {e}"[: wire.REASON_LEN]) from e
            raise
        # Region fds are kept (not needed for the mapping) so the connection can be
        # handed to another process (MemifInterface.export).
        region_fds = [fd for fd, _ in self.region_fds]
        self.region_fds = []
        for r, (msg, _) in zip(rings, c2s + s2c):
            r.where = (msg.region, msg.offset)
        rx, tx = rings[:nq], rings[nq:]
        for r in rings:
            r.reset()  # DPDK memif_connect zeroes head and tail of every ring
        for r in rx:
            r.flags = 0 if cfg.interrupt else wire.RING_FLAG_MASK_INT
        efds = [e for _, e in c2s + s2c]
        self.rings = []
        return MemifInterface("server", self.sock, views, maps, rx, tx, efds, cfg.interrupt,
                              peer_name, self.init.id if self.init else 0, region_fds)

    def abort(self) -> None:
        # Read what the client already queued (a pipelined client sends everything at
        # once) before closing: closing a Unix socket with unread data resets the peer
        # (ECONNRESET), which would hide the DISCONNECT reason we just sent.
        for _ in range(2 * wire.MAX_QUEUES + 8):
            try:
                _, fd = recv_msg(self.sock)
            except (OSError, ValueError):
                break
            if fd is not None:
                os.close(fd)
        self.sock.close()
        for fd, _ in self.region_fds:
            os.close(fd)
        for _, efd in self.rings:
            os.close(efd)
        self.region_fds = []
        self.rings = []


class MemifListener:
    """Server side: a control socket accepting memif clients, each one a MemifInterface.

    :meth:`fileno` is an epoll fd covering the listening socket and every handshake in
    progress, so one READABLE registration drives the whole thing; :meth:`accept` does
    the non-blocking work and returns a finished interface or None.

    ``ids``: interface ids served (None = any). Unlike a DPDK port (one peer per id, a
    second gets "Already connected"), a listener serves many clients on the same id:
    the stream stack makes each client one connection.
    """

    def __init__(self, address: str, config: MemifConfig = MemifConfig(),
                 ids: set[int] | None = None, handshake_timeout: float = 5.0) -> None:
        self.address = address
        self.config = config
        self.ids = ids
        self.handshake_timeout = handshake_timeout
        self._abstract = is_abstract(address)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.sock.bind(sockaddr(address))
            self.sock.listen(64)
            self.sock.setblocking(False)
            self._ep = select.epoll(sizehint=8, flags=select.EPOLL_CLOEXEC)
        except BaseException:
            self.sock.close()
            raise
        self._ep.register(self.sock.fileno(), select.EPOLLIN)
        self._pending: dict[int, _ServerHandshake] = {}
        self._ready: list[MemifInterface] = []
        self.closed = False
        self.rejected: list[str] = []  # reasons of failed handshakes (diagnostics)

    def fileno(self) -> int:
        return self._ep.fileno()

    def accept(self) -> MemifInterface | None:
        """Advance all handshakes; return one connected interface or None."""
        if self.closed:
            raise ClosedResourceError("memif listener")
        while True:
            try:
                s, _ = self.sock.accept()
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EINTR):
                    continue
                raise
            s.setblocking(False)
            try:
                hs = _ServerHandshake(s, self)
            except OSError:
                s.close()
                continue
            self._pending[s.fileno()] = hs
            self._ep.register(s.fileno(), select.EPOLLIN)
        now = time.monotonic()
        for fd, hs in list(self._pending.items()):
            try:
                iface = hs.step()
                if iface is None and now > hs.deadline:
                    raise MemifProtocolError(errno.ETIMEDOUT, "handshake timed out")
            except (OSError, ValueError) as e:
                self.rejected.append(str(e))
                self._ep.unregister(fd)
                del self._pending[fd]
                hs.abort()
                continue
            if iface is not None:
                self._ep.unregister(fd)
                del self._pending[fd]
                self._ready.append(iface)
        return self._ready.pop(0) if self._ready else None

    def accept_blocking(self, timeout: float) -> MemifInterface:
        """Wait (bounded) for the next connected client."""
        deadline = time.monotonic() + timeout
        while True:
            iface = self.accept()
            if iface is not None:
                return iface
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no memif client on {self.address!r}; rejected: {self.rejected}")
            select.select([self.fileno()], [], [], min(left, 0.25))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for hs in self._pending.values():
            hs.abort()
        self._pending.clear()
        for iface in self._ready:
            iface.close()
        self._ready = []
        self._ep.close()
        self.sock.close()
        if not self._abstract:
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass

    def __enter__(self) -> MemifListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
