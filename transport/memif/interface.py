"""memif connections: the client and server handshakes and :class:`MemifInterface`.

Protocol: shared/notes/memif.md §3 (DPDK ``memif_socket.c`` and ``rte_eth_memif.c``).

* **Client** (:class:`MemifConnector`, :func:`connect`): owns all memory. One region
  (``alloc_region``: MFD_HUGETLB first, plain memfd on ENOMEM) holds the C2S rings, the
  S2C rings, then ``2 * queues * ring_size`` buffers of ``bsize`` (DPDK's own layout,
  §3.5, though the server follows only the offsets it is told). One eventfd per ring.
* **Server** (:class:`MemifListener`): binds the control socket (abstract or filesystem),
  sends HELLO on accept, maps what it is given, zeroes head/tail on CONNECT.

Both handshakes are non-blocking state machines fed one message at a time (DPDK itself
answers one message per wake-up), so they run from an event loop.

Interrupt vs poll mode (§3.7): the *reader* of a ring sets MASK_INT when it polls; the
writer kicks the ring's eventfd after publishing unless MASK_INT is set.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ClosedResourceError, TransportError
from ..hugepages import Region, alloc_region
from . import wire
from .control import MemifDisconnected, is_abstract, recv_msg, send_msg, sockaddr
from .ring import Ring

__all__ = ["MemifConfig", "MemifInterface", "MemifConnector", "MemifListener", "connect",
           "MemifDisconnected", "MemifProtocolError"]

log = logging.getLogger(__name__)

_EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


class MemifProtocolError(TransportError):
    """The peer broke the handshake rules; it was sent DISCONNECT with the reason."""


@dataclass(frozen=True)
class MemifConfig:
    """Per-interface parameters (DPDK vdev option names in brackets)."""

    id: int = 0                 # [id]
    queues: int = 1             # queue pairs wanted (client) / allowed (server)
    log2_ring_size: int = 10    # [rsize]
    buffer_size: int = 2048     # [bsize]
    secret: bytes = b""         # [secret]
    name: bytes = b"asyncmsgr"
    interrupt: bool = True      # False = poll mode: set MASK_INT on the rings we read
    hugepages: bool = True      # client: try MFD_HUGETLB regions first

    def __post_init__(self) -> None:
        if not 1 <= self.log2_ring_size <= wire.MAX_LOG2_RING:
            raise ValueError(f"log2_ring_size must be 1..{wire.MAX_LOG2_RING}")
        if not 1 <= self.queues <= wire.MAX_QUEUES:
            raise ValueError(f"queues must be 1..{wire.MAX_QUEUES}")
        if not 64 <= self.buffer_size <= 0xFFFF:
            raise ValueError("buffer_size must be 64..65535 (a u16 in DPDK)")
        if len(self.secret) > wire.SECRET_LEN or len(self.name) > wire.NAME_LEN:
            raise ValueError("secret/name too long")


class MemifInterface:
    """One up memif connection: ``queues`` rx rings and ``queues`` tx rings.

    Data path: :meth:`tx_burst` / :meth:`rx_burst` never block and make no syscalls
    except the eventfd kick. Received frames are zero-copy memoryviews valid until the
    next ``rx_burst`` on that queue (see :mod:`.ring`).
    """

    def __init__(self, role: str, sock: socket.socket, regions: list[memoryview],
                 maps: Sequence[mmap.mmap | Region], rx: list[Ring], tx: list[Ring],
                 eventfds: list[int], interrupt: bool, peer_name: bytes, id: int,
                 region_fds: list[int] | None = None) -> None:
        self.role = role
        self._region_fds = region_fds or []
        self.sock = sock
        self._regions = regions
        self._maps: list[mmap.mmap | Region] = list(maps)
        self.rx_rings = rx
        self.tx_rings = tx
        self._eventfds = eventfds
        self.interrupt = interrupt
        self.peer_name = peer_name
        self.id = id
        self.closed = False
        self.down_reason: str | None = None
        self._tx = [r.tx_own if role == "client" else r.tx_posted for r in tx]
        self._rxf = [r.rx_posted if role == "client" else r.rx_peer for r in rx]

    @property
    def queues(self) -> int:
        return len(self.rx_rings)

    @property
    def hugetlb(self) -> bool:
        """True when our (client) region is on hugepages."""
        return any(isinstance(m, Region) and m.hugetlb for m in self._maps)

    def ring_size(self, qid: int = 0) -> int:
        return self.tx_rings[qid].size

    # -- data path ----------------------------------------------------------------------
    def tx_burst(self, frames: Sequence[bytes | bytearray | memoryview], qid: int = 0) -> int:
        """Enqueue as many whole frames as fit; returns how many (0 when the ring is full)."""
        return self._tx[qid](frames)

    def rx_burst(self, max_frames: int = 256, qid: int = 0) -> list[memoryview | bytes]:
        """Up to ``max_frames`` received frames (views valid until the next call)."""
        return self._rxf[qid](max_frames)

    def rx_wait(self, timeout: float, qid: int = 0) -> list[memoryview | bytes]:
        """:meth:`rx_burst`, waiting up to ``timeout`` seconds for frames: in ``select``
        on the rx eventfd in interrupt mode, spinning in poll mode."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.rx_burst(256, qid)
            left = deadline - time.monotonic()
            if got or left <= 0:
                return got
            if self.interrupt:
                select.select([self.fileno(qid)], [], [], min(0.01, left))
                self.clear_interrupt(qid)

    def warm_up(self, timeout: float = 10.0) -> None:
        """Before measuring or checking order against DPDK (memif.md §5 trap 2): testpmd
        flushes its rx queues when forwarding starts, so early frames can vanish. Send a
        marker frame until one comes back, then drain late echoes of earlier markers."""
        marker = b"\xff" * 64
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tx_burst([marker])
            if any(bytes(f) == marker for f in self.rx_wait(0.05)):
                while self.rx_wait(0.05):
                    pass
                return
        raise TimeoutError(f"no warm-up frame came back within {timeout} s: "
                           "is the peer up and forwarding?")

    def rx_release(self, qid: int = 0) -> None:
        """Return the slots of the last ``rx_burst`` to the peer now."""
        self.rx_rings[qid].release()

    def fileno(self, qid: int = 0) -> int:
        """The rx eventfd of queue ``qid``: readable after the peer kicks (interrupt mode)."""
        return self.rx_rings[qid].eventfd

    def clear_interrupt(self, qid: int = 0) -> None:
        """Drain the rx eventfd; call *before* ``rx_burst`` so no kick is lost."""
        try:
            os.eventfd_read(self.rx_rings[qid].eventfd)
        except BlockingIOError:
            pass

    def tx_space(self, qid: int = 0) -> int:
        """Free tx slots right now (client: ring free slots; server: posted buffers)."""
        r = self.tx_rings[qid]
        if self.role == "client":
            return r.size - r.in_flight()
        return (r.head - r._pos) & 0xFFFF

    def ctrl_fileno(self) -> int:
        """The control socket: readable on DISCONNECT or when the peer goes away."""
        return self.sock.fileno()

    def poll_control(self) -> None:
        """Handle pending control messages; raises :class:`MemifDisconnected` when down."""
        if self.down_reason is not None:
            raise MemifDisconnected(self.down_reason)
        if self.closed:
            raise ClosedResourceError("memif interface")
        while True:
            try:
                msg, fd = recv_msg(self.sock)
            except BlockingIOError:
                return
            except MemifDisconnected as e:
                self.down_reason = e.reason
                raise
            except OSError as e:
                self.down_reason = f"control socket error: {e}"
                raise MemifDisconnected(self.down_reason) from e
            if fd is not None:
                os.close(fd)
            if isinstance(msg, wire.Disconnect):
                self.down_reason = msg.reason.decode(errors="replace") or "disconnect"
                raise MemifDisconnected(self.down_reason, msg.code)
            # Anything else after CONNECTED is "Unexpected message" in DPDK too.
            self.down_reason = f"unexpected message {type(msg).__name__} while connected"
            self._send_disconnect("Unexpected message")
            raise MemifDisconnected(self.down_reason)

    def _send_disconnect(self, reason: str) -> None:
        try:
            send_msg(self.sock, wire.Disconnect(0, reason.encode()[: wire.REASON_LEN]))
        except OSError:
            pass

    # -- handoff to another process ----------------------------------------------------
    def export(self) -> tuple[dict[str, Any], list[int]]:
        """Hand this (server-side) connection to another process.

        Returns plain metadata and *new* fds (control socket, regions, eventfds) for the
        caller to send by SCM_RIGHTS and then close; :meth:`adopt` rebuilds the
        interface there. Consumed slots are returned to the peer first, so the shared
        ring headers hold all state (a server owns only the tails it publishes). This
        object is closed without a DISCONNECT: the peer never notices the move.
        """
        if self.role != "server":
            raise ValueError("only server-side memif connections can be exported")
        if self.closed:
            raise ClosedResourceError("memif interface")
        for q in range(self.queues):
            self.rx_rings[q].release()
        meta = {
            "version": 1, "interrupt": self.interrupt, "id": self.id,
            "peer_name": self.peer_name, "queues": self.queues,
            "regions": [len(v) for v in self._regions],
            "rings": [[*r.where, r.log2] for r in self.rx_rings + self.tx_rings],
        }
        fds = [os.dup(self.sock.fileno())] + [os.dup(fd) for fd in self._region_fds] \
            + [os.dup(fd) for fd in self._eventfds]
        self.down_reason = "exported"  # close() below sends nothing
        self.close()
        return meta, fds

    @classmethod
    def adopt(cls, meta: dict[str, Any], fds: list[int]) -> "MemifInterface":
        """Rebuild an exported server-side connection; takes ownership of ``fds``."""
        nreg = len(meta["regions"])
        nq = int(meta["queues"])
        if meta.get("version") != 1 or len(fds) != 1 + nreg + 2 * nq or len(meta["rings"]) != 2 * nq:
            for fd in fds:
                os.close(fd)
            raise ValueError("memif export metadata does not match the fds")
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(False)
        region_fds = fds[1:1 + nreg]
        efds = fds[1 + nreg:]
        maps: list[mmap.mmap] = []
        views: list[memoryview] = []
        try:
            for fd, size in zip(region_fds, meta["regions"]):
                m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                maps.append(m)
                views.append(memoryview(m))
            rings = []
            for (reg, off, log2), efd in zip(meta["rings"], efds):
                r = Ring(views[reg], off, log2, views, efd)
                r.where = (reg, off)
                # Our private counters are the tails we published (rx: consumed and
                # released; tx: filled), both in shared memory.
                r._pos = r._rel = r.tail
                rings.append(r)
        except BaseException:
            for v in views:
                v.release()
            for m in maps:
                m.close()
            sock.close()
            for fd in region_fds + efds:
                os.close(fd)
            raise
        return cls("server", sock, views, maps, rings[:nq], rings[nq:], efds,
                   bool(meta["interrupt"]), bytes(meta["peer_name"]), int(meta["id"]),
                   region_fds)

    def close(self, reason: str = "closed") -> None:
        """Send DISCONNECT (best effort), close the control socket, eventfds and maps."""
        if self.closed:
            return
        self.closed = True
        if self.down_reason is None:
            self._send_disconnect(reason)
        self.sock.close()
        for fd in self._eventfds + self._region_fds:
            os.close(fd)
        self._eventfds = []
        self._region_fds = []
        # Ring views pin the maps; drop them first so the maps can really be closed.
        for r in self.rx_rings + self.tx_rings:
            for v in (r.h16, r.h32, r.desc):
                v.release()
        self.rx_rings = []
        self.tx_rings = []
        for v in self._regions:
            try:
                v.release()
            except BufferError:
                pass  # a caller still holds a frame view; the map goes with it
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass
        self._regions = []
        self._maps = []

    def __enter__(self) -> "MemifInterface":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- client --------------------------------------------------------------------------------
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
            again = "ID not found" in e.reason or not conn._hello
            if not (retry_not_found and again) or time.monotonic() + delay > deadline:
                raise
        except BaseException:
            conn.abort()
            raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


# -- server --------------------------------------------------------------------------------
class _ServerHandshake:
    """One accepted control connection until CONNECT (server side of §3.4)."""

    def __init__(self, sock: socket.socket, listener: "MemifListener") -> None:
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

    def __enter__(self) -> "MemifListener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
