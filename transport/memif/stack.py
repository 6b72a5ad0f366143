"""``MemifStack``: the ``dpdk`` network stack, one memif connection per stream socket.

``listen(path)`` binds a memif control socket (``@name`` or ``"\\0name"`` = abstract,
else a filesystem path); every memif client that completes the handshake becomes one
:class:`~.stream.MemifStream`. ``connect(path)`` is a memif client: it creates the
regions (hugepages when free, plain memfd otherwise), rings and eventfds.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ClosedResourceError
from ..event_center import EventCenter
from ..stack import Address, ConnectedSocket, NetworkStack, ServerSocket, SocketOptions
from .client import MemifConnector
from .interface import MemifConfig
from .server import MemifListener
from .stream import MemifStream

__all__ = ["MemifServerSocket", "MemifStack", "MemifStream", "StackConfig"]


@dataclass(frozen=True)
class StackConfig:
    """memif parameters for every connection of a stack.

    The default buffers are 16 KiB (256 per ring, 4 MiB per direction) rather than
    DPDK's 2 KiB x 1024: a stream pays Python work per segment, and Messenger frames are
    rarely Ethernet-sized (4 KiB echo at window 128, poll mode: 37.6k req/s with 2 KiB
    buffers, 49.9k with 16 KiB; BENCHMARKS.md). Interop with DPDK uses MemifConfig
    directly and keeps its defaults."""

    memif: MemifConfig = MemifConfig(buffer_size=16384, log2_ring_size=8)
    #: Segments in flight per direction; None = ring size / 2 - 16 (the maximum).
    window: int | None = None
    rcvbuf: int = 4 << 20


def _addr(addr: Address) -> str:
    if not isinstance(addr, str):
        raise TypeError(f"memif addresses are socket paths (str), got {addr!r}")
    return addr


def _attach(stream: MemifStream, center: EventCenter | None) -> MemifStream:
    """Poll mode: register the stream's busy poller on the center (removed on close)."""
    if center is not None:
        stream.bind_poller(center)
    return stream


class MemifServerSocket(ServerSocket):
    """A memif control socket; ``fileno`` covers the listener and handshakes in progress."""

    def __init__(self, addr: str, cfg: StackConfig, center: EventCenter | None = None) -> None:
        self._cfg = cfg
        self._center = center
        self._listener: MemifListener | None = MemifListener(addr, cfg.memif)
        self._addr = addr

    def fileno(self) -> int:
        if self._listener is None:
            raise ClosedResourceError("memif server socket")
        return self._listener.fileno()

    def accept(self) -> ConnectedSocket | None:
        if self._listener is None:
            raise ClosedResourceError("memif server socket")
        iface = self._listener.accept()
        if iface is None:
            return None
        return _attach(MemifStream(iface, window=self._cfg.window, rcvbuf=self._cfg.rcvbuf,
                                   mss=self._cfg.memif.buffer_size - 12), self._center)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    @property
    def address(self) -> Address:
        return self._addr


class MemifStack(NetworkStack):
    """The ``dpdk`` stack: DPDK's memif protocol in Python (interoperable with net_memif)."""

    name = "dpdk"

    def __init__(self, config: StackConfig = StackConfig()) -> None:
        self.config = config
        self._center: EventCenter | None = None

    def bind_center(self, center: EventCenter) -> None:
        """Poll mode (``config.memif.interrupt`` False) needs the center that runs the
        sockets: each connection adds a busy poller to it. Interrupt mode needs nothing.
        The Messenger calls this with its center."""
        self._center = center

    def _poll_center(self) -> EventCenter | None:
        if self.config.memif.interrupt:
            return None
        if self._center is None:
            raise RuntimeError("memif poll mode needs bind_center(center) before use")
        return self._center

    def listen(self, addr: Address, opts: SocketOptions = SocketOptions()) -> ServerSocket:
        return MemifServerSocket(_addr(addr), self.config, self._poll_center())

    def connect(self, addr: Address, opts: SocketOptions = SocketOptions()) -> ConnectedSocket:
        path = _addr(addr)
        conn = MemifConnector(path, self.config.memif, pipelined=True)
        return _attach(MemifStream(conn, window=self.config.window, rcvbuf=self.config.rcvbuf,
                                   address=path, mss=self.config.memif.buffer_size - 12),
                       self._poll_center())
