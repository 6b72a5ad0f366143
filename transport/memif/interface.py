"""One memif connection once its handshake is done (:class:`MemifInterface`) and its config.

The handshakes that build one live in :mod:`.client` and :mod:`.server`.

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
from ..hugepages import Region
from . import wire
from .control import MemifDisconnected, recv_msg, send_msg
from .ring import Ring

__all__ = ["MemifConfig", "MemifDisconnected", "MemifInterface", "MemifProtocolError"]

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
        return r.posted_free()

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
    def adopt(cls, meta: dict[str, Any], fds: list[int]) -> MemifInterface:
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
                r.resume()
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

    def __enter__(self) -> MemifInterface:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
