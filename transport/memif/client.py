"""The memif client handshake (:class:`MemifConnector`, :func:`connect`): the client owns all memory.

One region (``alloc_region``: MFD_HUGETLB first, plain memfd on ENOMEM) holds the C2S
rings, the S2C rings, then ``2 * queues * ring_size`` buffers of ``bsize`` (DPDK's own
layout, shared/notes/memif.md §3.5). One eventfd per ring.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time

from ..hugepages import Region, alloc_region
from . import wire
from .control import MemifDisconnected, recv_msg, send_msg, sockaddr
from .interface import MemifConfig, MemifInterface, MemifProtocolError
from .ring import Ring

__all__ = ["MemifConnector", "connect"]

_EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


class MemifConnector:
    """Non-blocking client handshake: call :meth:`step` whenever the socket is readable.

    HELLO → INIT/ACK → ADD_REGION(fd)/ACK → ADD_RING(fd)/ACK for every C2S then every
    S2C ring → CONNECT/CONNECTED (§3.4). Lock-step by default (what DPDK expects; memory
    and eventfds are created after HELLO, sized by the server's limits). ``pipelined``
    sends every message at once, sized by our config, and checks HELLO when it comes:
    the stream stack uses it so a connect needs no reply before the listener's owner
    gets around to ``accept`` (as the kernel completes a TCP connect).
    """

    def __init__(self, address: str, config: MemifConfig = MemifConfig(),
                 connect_timeout: float = 2.0, pipelined: bool = False) -> None:
        self.address = address
        self.config = config
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._region: Region | None = None
        self._eventfds: list[int] = []
        self._queue: list[tuple[wire.Message, int | None]] = []
        self._rings: list[tuple[bool, int, int]] = []  # (c2s, index, offset)
        self._queues = 0
        self._log2 = 0
        self._hello = False
        self.done: MemifInterface | None = None
        try:
            # A Unix connect only waits while the listen backlog is full, and a
            # non-blocking one would fail with EAGAIN instead of completing later: connect
            # with a short bound, then go non-blocking for the lock-step handshake.
            self.sock.settimeout(connect_timeout)
            self.sock.connect(sockaddr(address))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.pipelined = pipelined
        self._acks_due = 0
        if pipelined:
            # Announce everything now, sized by our own config; HELLO is checked when it
            # arrives. The server reads one message at a time either way (DPDK does too),
            # so a peer that answers later (ours, from its accept loop) is served in order.
            try:
                self._prepare(config.queues, config.log2_ring_size)
                self._acks_due = len(self._queue) - 1  # every message but CONNECT is ACKed
                while self._queue:
                    self._send_next()
            except BaseException:
                self.abort()
                raise

    @property
    def got_hello(self) -> bool:
        """True once the server's HELLO arrived (a hang-up before it is worth a retry)."""
        return self._hello

    def fileno(self) -> int:
        return self.sock.fileno()

    def step(self) -> MemifInterface | None:
        """Process available messages; the interface once CONNECTED, else None.

        Raises :class:`MemifDisconnected` (e.g. "ID not found") or
        :class:`MemifProtocolError`; resources are released on any error.
        """
        try:
            while self.done is None:
                try:
                    msg, fd = recv_msg(self.sock)
                except BlockingIOError:
                    return None
                if fd is not None:
                    os.close(fd)  # the server never sends fds
                self._on_message(msg)
            return self.done
        except BaseException:
            self.abort()
            raise

    def _send_next(self) -> None:
        msg, fd = self._queue.pop(0)
        send_msg(self.sock, msg, fd)

    def _on_message(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.Disconnect):
            raise MemifDisconnected(msg.reason.decode(errors="replace"), msg.code)
        if isinstance(msg, wire.Hello):
            if self._hello:
                raise self._fail("Unexpected message")
            self._hello = True
            if not msg.min_version <= wire.VERSION <= msg.max_version:
                raise self._fail("Incompatible memif version")
            # HELLO's max_* are the highest *numbers*, not counts (§3.3).
            cfg = self.config
            nq = min(cfg.queues, msg.max_c2s_ring + 1, msg.max_s2c_ring + 1)
            log2 = min(cfg.log2_ring_size, msg.max_log2_ring_size)
            if self.pipelined:
                if (nq, log2) != (self._queues, self._log2):
                    raise self._fail("Incompatible ring limits")
                return
            if nq < 1:
                raise self._fail("server offers no rings")
            self._prepare(nq, log2)
            self._send_next()
            return
        if not self._hello:
            raise self._fail("Unexpected message")
        if isinstance(msg, wire.Ack):
            if self.pipelined:
                self._acks_due -= 1
                if self._acks_due < 0:
                    raise self._fail("Unexpected message")
                return
            if self._queue:
                self._send_next()
                return
            raise self._fail("Unexpected message")
        if type(msg) is wire.Connected and not self._queue and self._acks_due == 0:
            self.done = self._build()
            return
        raise self._fail("Unexpected message")

    def _fail(self, reason: str) -> MemifProtocolError:
        try:
            send_msg(self.sock, wire.Disconnect(0, reason.encode()))
        except OSError:
            pass
        return MemifProtocolError(errno.EPROTO, reason)

    def _prepare(self, nq: int, log2: int) -> None:
        """Create region, rings and eventfds for ``nq`` queue pairs; queue the messages."""
        cfg = self.config
        self._queues, self._log2 = nq, log2
        ring_stride = (wire.ring_bytes(log2) + 127) // 128 * 128
        rings_size = 2 * nq * ring_stride
        size = rings_size + 2 * nq * (1 << log2) * cfg.buffer_size
        self._region = alloc_region(size, name="memif_region_0", hugepages=cfg.hugepages)
        for k in range(2 * nq):
            self._eventfds.append(os.eventfd(0, _EFD_FLAGS))
        self._queue.append((wire.Init(wire.VERSION, cfg.id, wire.MODE_ETHERNET, cfg.secret,
                                      cfg.name), None))
        self._queue.append((wire.AddRegion(0, self._region.size), self._region.fd))
        for k in range(2 * nq):
            c2s = k < nq
            idx = k if c2s else k - nq
            off = k * ring_stride
            self._rings.append((c2s, idx, off))
            self._queue.append((wire.AddRing(wire.RING_FLAG_C2S if c2s else 0, idx, 0, off, log2, 0),
                                self._eventfds[k]))
        self._queue.append((wire.Connect(cfg.name), None))
        # Initialise rings before anything is announced: the server checks cookies on CONNECT.
        mv = memoryview(self._region.map)
        self._mv = mv
        self._ring_objs = []
        for k, (c2s, idx, off) in enumerate(self._rings):
            r = Ring(mv, off, log2, [mv], self._eventfds[k])
            r.init_header()
            r.set_buffers(0, rings_size + k * (1 << log2) * cfg.buffer_size, cfg.buffer_size)
            self._ring_objs.append(r)

    def _build(self) -> MemifInterface:
        nq = self._queues
        tx = self._ring_objs[:nq]
        rx = self._ring_objs[nq:]
        for r in rx:
            # We read S2C: interrupt mode leaves MASK_INT clear so the server kicks us.
            r.flags = 0 if self.config.interrupt else wire.RING_FLAG_MASK_INT
            r.post_all()  # only after CONNECTED: CONNECT made the server zero head/tail
        assert self._region is not None
        iface = MemifInterface("client", self.sock, [self._mv], [self._region], rx, tx,
                               self._eventfds, self.config.interrupt, b"", self.config.id)
        self._region = None
        self._eventfds = []
        return iface

    def abort(self) -> None:
        """Release everything of an unfinished handshake."""
        if self.done is not None:
            return
        self.sock.close()
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds = []
        for r in getattr(self, "_ring_objs", []):
            for v in (r.h16, r.h32, r.desc):
                v.release()
        self._ring_objs = []
        if hasattr(self, "_mv"):
            self._mv.release()
        if self._region is not None:
            self._region.close()
            self._region = None


def connect(address: str, config: MemifConfig = MemifConfig(), timeout: float = 10.0,
            retry_not_found: bool = True) -> MemifInterface:
    """Blocking client connect with a deadline.

    Retries while the server is not there yet, answers "ID not found" (§5 trap 1: DPDK
    answers that until the port is started) or hangs up before HELLO.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            conn = MemifConnector(address, config)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)  # waiting for an external process's listener: back off
            delay = min(delay * 2, 0.1)
            continue
        try:
            while True:
                iface = conn.step()
                if iface is not None:
                    return iface
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"memif handshake with {address!r} timed out")
                select.select([conn.fileno()], [], [], left)
        except MemifDisconnected as e:
            # Also retry a hang-up before HELLO: a DPDK server still tearing down the
            # previous connection closes a new control socket without a word.
            again = "ID not found" in e.reason or not conn.got_hello
            if not (retry_not_found and again) or time.monotonic() + delay > deadline:
                raise
        except BaseException:
            conn.abort()
            raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
