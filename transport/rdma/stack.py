"""The ``rdma`` network stack: byte streams over RC queue pairs (Ceph's ``RDMAStack``).

Per connection (Ceph shares one TX cluster and RX pool per stack; we give each
connection its own registered pools so a stalled connection cannot starve the others
and no cross-connection wake-ups are needed):

* **Side channel.** A Unix SOCK_SEQPACKET socket (softverbs needs SCM_RIGHTS to pass
  its regions; TCP works for pyverbs, which passes no fds). The client sends HELLO
  {verbs info, receive credits, chunk size} after posting its receives; the server
  connects its QP (INIT->RTR->RTS), posts receives and replies HELLO; the client
  connects its QP and sends ACK, which is when the server may send (Ceph's IBSYN
  exchange). The socket then stays open only to detect the peer's death (EOF).
* **Chunks.** TX and RX pools are registered regions cut into ``chunk_size`` chunks
  (hugepages when available via ``alloc_region``). Every receive is posted before the
  peer is told we are ready; a send completion returns its TX chunk.
* **Credits.** A sender may have at most as many DATA messages in flight as the peer
  has announced receive buffers (a cumulative ``credits`` total in every header), so
  the peer never sees receiver-not-ready for data. Credit updates ride on DATA headers;
  a CTRL message carries them when there is nothing to send. The receiver keeps
  ``CTRL_SLOTS`` extra receives for CTRL messages, which it re-posts at once; CTRL
  messages are windowed by an ack count in every header, and an ack-only CTRL is sent
  when half the window is owed (never in reply to an ack alone, so no ping-pong). The
  only way to meet RNR is an ack-only CTRL beyond the window, which rnr_retry=7
  (infinite, Ceph's setting) turns into a short delay, never an error.
* **Readiness.** ``fileno()`` is an epoll fd over the CQ fd, the side channel and a
  notify eventfd; it is readable when data, credits, EOF or an error arrived.
  ``write_fileno()`` is None (transport/stack.py's contract for one-fd stacks): after
  a ``send`` raised BlockingIOError, ``fileno()`` turns readable once send space is back
  and *stays* readable until ``send`` is called again, so an owner that reads first and
  flushes second cannot lose that wake-up. The owner must therefore retry its pending
  output on READABLE (as tests/conformance/suite.py's Endpoint does).
* **Shutdown.** FIN is an in-band flag (after all data, RC keeps order). Side-channel
  EOF without FIN, a dead peer, or an error completion is a reset.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from collections import deque

from ..errors import ClosedResourceError
from ..stack import (
    Address,
    NetworkStack,
    ServerSocket,
    SocketOptions,
)
from .verbs import (
    Device,
    Provider,
    QPParams,
    VerbsError,
)

__all__ = ["PROVIDER_ENV", "RdmaConnectedSocket", "RdmaServerSocket", "RdmaStack", "get_provider"]

log = logging.getLogger("transport.rdma")

from .connection import HDR_SIZE, RdmaConnectedSocket
from .sidechannel import SideChannel

#: Overrides the provider of ``RdmaStack()`` when no provider is passed.
PROVIDER_ENV = "ASYNCMSGR_RDMA_PROVIDER"


def get_provider(name: str | None = None) -> Provider:
    """``softverbs``, ``pyverbs``, or ``auto``: pyverbs when a device is listed, otherwise
    softverbs (an EMULATION; logged as such). None: ``$ASYNCMSGR_RDMA_PROVIDER`` or auto."""
    if name is None:
        name = os.environ.get(PROVIDER_ENV, "auto")
    if name == "softverbs":
        from .softverbs import SoftVerbsProvider
        return SoftVerbsProvider()
    if name == "pyverbs":
        from .pyverbs_provider import PyverbsProvider
        return PyverbsProvider()
    if name == "auto":
        from .pyverbs_provider import PyverbsProvider, device_status
        ok, why = device_status()
        if ok:
            return PyverbsProvider()
        log.info("rdma: %s; using softverbs (EMULATION over shared memory)", why)
        from .softverbs import SoftVerbsProvider
        return SoftVerbsProvider()
    raise ValueError(f"unknown verbs provider {name!r} (softverbs, pyverbs, auto)")


class RdmaServerSocket(ServerSocket):
    """A listening side channel. ``accept`` returns a connection once the client's HELLO
    was answered; ``fileno()`` is an epoll over the listener and pending handshakes."""

    MAX_PENDING = 256

    def __init__(self, stack: RdmaStack, sock: socket.socket, addr: Address, unlink: bool) -> None:
        self._stack = stack
        self._sock = sock
        self._addr = addr
        self._unlink = unlink
        self._ino = os.stat(addr).st_ino if unlink and isinstance(addr, str) else None
        self._ep = select.epoll()
        self._ep.register(sock.fileno(), select.EPOLLIN)
        self._rfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._rfd, select.EPOLLIN)
        self._pending: dict[int, SideChannel] = {}
        self._ready: deque[RdmaConnectedSocket] = deque()
        self._closed = False

    def fileno(self) -> int:
        return self._ep.fileno()

    @property
    def address(self) -> Address:
        return self._addr

    def accept(self) -> RdmaConnectedSocket | None:
        if self._closed:
            raise ClosedResourceError("rdma listener")
        try:
            os.eventfd_read(self._rfd)
        except BlockingIOError:
            pass
        for _ in range(64):  # bounded per call; level triggering brings us back
            try:
                s, _ = self._sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("rdma accept: %s", exc)
                break
            s.setblocking(False)
            if len(self._pending) >= self.MAX_PENDING:
                # Clients that connect and never say HELLO must not pin fds forever.
                old_fd = next(iter(self._pending))
                self._ep.unregister(old_fd)
                self._pending.pop(old_fd).close()
            self._pending[s.fileno()] = SideChannel(s)
            self._ep.register(s.fileno(), select.EPOLLIN)
        for fd, side in list(self._pending.items()):
            try:
                got = side.recv()
            except OSError:
                got = (b"", [])
            if got is None:
                continue
            del self._pending[fd]
            self._ep.unregister(fd)
            data, fds = got
            if not data:
                side.close()
                continue
            conn: RdmaConnectedSocket | None = None
            try:
                conn = RdmaConnectedSocket(self._stack, side, client=False)
                self._stack.track(conn)
                conn.server_handshake(data, fds)
            except OSError as exc:
                # A client that went away mid-handshake is routine (fault injection,
                # a connect timeout); anything else is worth a warning.
                gone = exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED)
                (log.debug if gone else log.warning)("rdma handshake failed: %s", exc)
                if conn is not None:
                    conn.close()
                else:
                    side.close()
                continue
            self._ready.append(conn)
        if not self._ready:
            return None
        conn = self._ready.popleft()
        if self._ready:
            os.eventfd_write(self._rfd, 1)
        return conn

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for side in self._pending.values():
            side.close()
        self._pending.clear()
        for conn in self._ready:
            conn.close()
        self._ready.clear()
        if self._ino is not None and isinstance(self._addr, str):
            try:
                if os.stat(self._addr).st_ino == self._ino:
                    os.unlink(self._addr)
            except OSError:
                pass
        self._sock.close()
        self._ep.close()
        os.close(self._rfd)


class RdmaStack(NetworkStack):
    """Sockets over verbs RC queue pairs.

    ``provider``: "softverbs" (EMULATION), "pyverbs", "auto" (pyverbs only when a device
    is listed) or None (``$ASYNCMSGR_RDMA_PROVIDER``, default auto). The device is opened
    on first use, i.e. after a worker forked (verbs resources do not survive fork).
    Addresses are side-channel addresses: a Unix path (or "\\0abstract") or, for the
    pyverbs provider only, ("host", port) over TCP. Both ends must use one provider.
    """

    name = "rdma"
    CTRL_SLOTS = 4

    def __init__(self, provider: str | Provider | None = None, *, chunk_size: int = 64 * 1024,
                 rx_chunks: int = 16, tx_chunks: int = 16, hugepages: bool = True,
                 qp_params: QPParams = QPParams(), device_name: str | None = None) -> None:
        if chunk_size <= HDR_SIZE or rx_chunks < 2 or tx_chunks < 1:
            raise ValueError("chunk_size must exceed the header; rx_chunks >= 2, tx_chunks >= 1")
        self.provider = provider if isinstance(provider, Provider) else get_provider(provider)
        self.chunk_size = chunk_size
        self.rx_chunks = rx_chunks
        self.tx_chunks = tx_chunks
        self.hugepages = hugepages
        self.qp_params = qp_params
        self._device_name = device_name
        self._device: Device | None = None
        self._device_pid = 0
        self._conns: set[RdmaConnectedSocket] = set()

    @property
    def emulated(self) -> bool:
        return self.provider.emulated

    @property
    def device(self) -> Device:
        if self._device is not None and self._device_pid != os.getpid():
            # Opened before a fork: verbs resources do not survive fork (ibv_fork_init
            # aside), so a forked worker opens its own and leaves the parent's alone.
            self._device = None
            self._conns = set()
        if self._device is None:
            self._device = self.provider.open_device(self._device_name)
            self._device_pid = os.getpid()
        return self._device

    def track(self, conn: RdmaConnectedSocket) -> None:
        """Remember a socket of this stack so that :meth:`close` closes it."""
        self._conns.add(conn)

    def forget(self, conn: RdmaConnectedSocket) -> None:
        """A socket of this stack closed (it calls this itself)."""
        self._conns.discard(conn)

    @staticmethod
    def _family(addr: Address) -> int:
        return socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET6 if ":" in addr[0] else socket.AF_INET

    def _check_family(self, fam: int) -> None:
        if fam != socket.AF_UNIX and self.provider.name == "softverbs":
            raise VerbsError(errno.EPROTONOSUPPORT,
                             "softverbs passes memory by SCM_RIGHTS: its side channel must be a Unix socket path")

    def listen(self, addr: Address, opts: SocketOptions = SocketOptions()) -> RdmaServerSocket:
        fam = self._family(addr)
        self._check_family(fam)
        kind = socket.SOCK_SEQPACKET if fam == socket.AF_UNIX else socket.SOCK_STREAM
        sock = socket.socket(fam, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            if fam != socket.AF_UNIX and opts.reuseaddr:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(opts.backlog)
            bound: Address = addr if fam == socket.AF_UNIX else sock.getsockname()[:2]
        except BaseException:
            sock.close()
            raise
        unlink = fam == socket.AF_UNIX and isinstance(addr, str) and not addr.startswith("\0")
        return RdmaServerSocket(self, sock, bound, unlink)

    def connect(self, addr: Address, opts: SocketOptions = SocketOptions()) -> RdmaConnectedSocket:
        fam = self._family(addr)
        self._check_family(fam)
        kind = socket.SOCK_SEQPACKET if fam == socket.AF_UNIX else socket.SOCK_STREAM
        sock = socket.socket(fam, kind | socket.SOCK_CLOEXEC)
        try:
            if fam == socket.AF_UNIX:
                # A Unix connect completes at once unless the backlog is full; bound it.
                sock.settimeout(5.0)
                sock.connect(addr)
                sock.setblocking(False)
            else:
                if opts.nodelay:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                try:
                    sock.connect(addr)
                except BlockingIOError:
                    pass
        except BaseException:
            sock.close()
            raise
        conn = RdmaConnectedSocket(self, SideChannel(sock), client=True)
        self._conns.add(conn)
        if fam == socket.AF_UNIX:
            try:
                conn.start_client()
            except BaseException:
                conn.close()
                raise
        else:
            conn.wait_connect()
        return conn

    def adopt(self, sock: socket.socket) -> RdmaConnectedSocket:
        """The server end of a side channel accepted elsewhere.

        Unix sockets have no SO_REUSEPORT, so a pool accepts in one process (the
        Processor) and hands each accepted fd to a worker by SCM_RIGHTS; the worker
        adopts it here. The QP and its regions are then created in the worker, whose
        loop runs the handshake: ``fileno()`` turns readable when the HELLO arrives and
        ``read_into``/``send`` raise BlockingIOError until the connection is up.
        """
        self._check_family(sock.family)
        sock.setblocking(False)
        conn = RdmaConnectedSocket(self, SideChannel(sock), client=False)
        self._conns.add(conn)
        return conn

    def close(self) -> None:
        """Close every socket still open and the device (this process's only)."""
        if self._device is not None and self._device_pid != os.getpid():
            self._device, self._conns = None, set()
        for conn in list(self._conns):
            conn.close()
        if self._device is not None:
            self._device.close()
            self._device = None
