"""Non-blocking kernel sockets behind the :mod:`transport.stack` interface.

Facts:

* Every socket is created with SOCK_NONBLOCK | SOCK_CLOEXEC in one ``socket(2)`` call, so
  no fork/exec window leaks it (socket(2), "Since Linux 2.6.27").
* ``send`` passes MSG_NOSIGNAL: a write to a shut-down or reset stream returns EPIPE
  instead of raising SIGPIPE, whatever the process's signal disposition (send(2)).
* A non-blocking TCP ``connect`` returns EINPROGRESS; completion is signalled by
  writability, and SO_ERROR then holds the result, cleared by reading it (connect(2),
  "EINPROGRESS"). A non-blocking Unix-socket connect never returns EINPROGRESS: it
  completes at once or fails with EAGAIN when the listener's backlog is full (unix(7)).
* ``accept`` errors ECONNABORTED and the network errors listed in accept(2) "Error
  handling" (ENETDOWN, EPROTO, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP,
  ENETUNREACH) belong to one dying connection, not to the listener: retry. EMFILE,
  ENFILE, ENOBUFS and ENOMEM are capacity errors that leave the listener readable; the
  caller (:class:`transport.listener.AcceptLoop`) must back off or it spins
  (supervisors.md §2.3). EINTR is retried by CPython itself (PEP 475).
* ``sendmsg`` takes at most IOV_MAX buffers per call (EMSGSIZE beyond, sendmsg(2) /
  ``sysconf(_SC_IOV_MAX)``); longer lists are sent in IOV_MAX slices.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ClosedResourceError
from ..stack import (
    Address,
    Buffer,
    ConnectedSocket,
    NetworkStack,
    ServerSocket,
    SocketOptions,
)

__all__ = ["IOV_MAX", "PosixConnectedSocket", "PosixServerSocket", "PosixStack"]


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):  # pragma: no cover - every Linux has it
        value = -1
    return value if value > 0 else 1024


#: Most buffers one ``sendmsg`` accepts (cached: sysconf is a libc call).
IOV_MAX = _iov_max()

_SOCK_FLAGS = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_ACCEPT_RETRY = frozenset(
    getattr(errno, name) for name in (
        "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH")
    if hasattr(errno, name))


def _resolve(addr: Address) -> tuple[int, Any]:
    """(family, sockaddr) for a stack address."""
    if isinstance(addr, str):
        if not addr:
            raise ValueError("empty Unix socket path")
        return socket.AF_UNIX, addr
    host, port = addr
    if not host:
        return socket.AF_INET, ("", port)  # INADDR_ANY
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family, (host, port)
    # A name ("localhost"): resolve once, first answer wins (blocking, setup time only).
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return family, sockaddr


def _normalize(raw: Any, family: int) -> Address | None:
    """A kernel sockaddr as a stack :data:`Address`."""
    if family == socket.AF_UNIX:
        if isinstance(raw, bytes):  # abstract names come back as bytes
            return os.fsdecode(raw)
        return str(raw)
    if isinstance(raw, tuple) and len(raw) >= 2:
        return (str(raw[0]), int(raw[1]))
    return None


def _new_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM | _SOCK_FLAGS)
    sock.setblocking(False)  # no-op where SOCK_NONBLOCK worked; keeps CPython's view in sync
    return sock


def _apply_buffers(sock: socket.socket, opts: SocketOptions) -> None:
    if opts.rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, opts.rcvbuf)
    if opts.sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, opts.sndbuf)


def _closed_io(*_args: object) -> int:
    raise ClosedResourceError("socket")


class PosixConnectedSocket(ConnectedSocket):
    """A connected (or connecting) non-blocking stream socket."""

    can_detach_fd = True  # a kernel socket: SCM_RIGHTS moves it to another process

    def __init__(self, sock: socket.socket, *, connected: bool = True) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._family = sock.family
        self._connected = connected
        self._error: OSError | None = None
        self._closed = False
        # Bound methods cached once: read_into/send are the hot path of every worker.
        self._recv_into: Callable[..., int] = sock.recv_into
        self._send: Callable[..., int] = sock.send
        self._sendmsg: Callable[..., int] = sock.sendmsg

    @classmethod
    def from_socket(cls, sock: socket.socket) -> PosixConnectedSocket:
        """Adopt an established socket (e.g. one handed over by another process)."""
        sock.setblocking(False)
        if sock.family in _TCP_FAMILIES:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, connected=True)

    @classmethod
    def from_fd(cls, fd: int) -> PosixConnectedSocket:
        """Adopt an established socket fd; the object owns ``fd`` from now on."""
        return cls.from_socket(socket.socket(fileno=fd))

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self._connected else "connecting")
        return f"<PosixConnectedSocket fd={self._fd} {state}>"

    def fileno(self) -> int:
        return self._fd

    def is_connected(self) -> int:
        """1 once established, 0 while EINPROGRESS; raises the connect error (from
        SO_ERROR, e.g. ConnectionRefusedError) on this and every later call."""
        if self._connected:
            return 1
        if self._error is not None:
            raise self._error
        if self._closed:
            raise ClosedResourceError("socket")
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            # SO_ERROR is cleared by reading it: remember it for later calls.
            self._error = OSError(err, os.strerror(err))  # maps to ConnectionRefusedError...
            raise self._error
        try:
            self._sock.getpeername()
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                return 0  # still EINPROGRESS
            raise
        self._connected = True
        return 1

    def read_into(self, buf: memoryview) -> int:
        return self._recv_into(buf)

    def send(self, buffers: Sequence[Buffer]) -> int:
        """One ``send``/``sendmsg`` (MSG_NOSIGNAL) of at most IOV_MAX buffers."""
        n = len(buffers)
        if n == 1:
            return self._send(buffers[0], _MSG_NOSIGNAL)
        if n == 0:
            return 0
        if n > IOV_MAX:
            buffers = list(itertools.islice(buffers, IOV_MAX))
        return self._sendmsg(buffers, (), _MSG_NOSIGNAL)

    def shutdown(self) -> None:
        if self._closed:
            return
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # already shut down or never connected
                raise

    def close(self) -> None:
        if self._closed:
            return
        self._mark_closed()
        self._sock.close()

    def detach(self) -> int:
        """Give up the fd (still open, still non-blocking) to the caller."""
        if self._closed:
            raise ClosedResourceError("socket")
        self._mark_closed()
        return self._sock.detach()

    def _mark_closed(self) -> None:
        self._closed = True
        self._recv_into = self._send = self._sendmsg = _closed_io

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def socket(self) -> socket.socket:
        """The underlying socket object (for options this interface does not cover)."""
        return self._sock

    @property
    def peer_address(self) -> Address | None:
        try:
            return _normalize(self._sock.getpeername(), self._family)
        except OSError:
            return None

    @property
    def local_address(self) -> Address | None:
        try:
            return _normalize(self._sock.getsockname(), self._family)
        except OSError:
            return None


class PosixServerSocket(ServerSocket):
    """A listening socket; ``accept`` never blocks."""

    def __init__(self, sock: socket.socket, opts: SocketOptions, *, unlink_path: str | None = None) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._opts = opts
        self._tcp = sock.family in _TCP_FAMILIES
        self._address = _normalize(sock.getsockname(), sock.family)
        # Only the process that bound a filesystem Unix socket removes its path, so a
        # forked child closing its copy does not unlink the parent's listener.
        self._unlink = (unlink_path, os.getpid()) if unlink_path else None
        self._closed = False

    def __repr__(self) -> str:
        return f"<PosixServerSocket fd={self._fd} {self._address!r}{' closed' if self._closed else ''}>"

    def fileno(self) -> int:
        return self._fd

    @property
    def socket(self) -> socket.socket:
        return self._sock

    @property
    def address(self) -> Address:
        assert self._address is not None
        return self._address

    def accept(self) -> PosixConnectedSocket | None:
        if self._closed:
            raise ClosedResourceError("server socket")
        while True:
            try:
                sock, _ = self._sock.accept()
            except BlockingIOError:
                return None
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY:
                    continue  # that connection died in the queue; try the next one
                raise  # EMFILE/ENFILE/ENOBUFS/ENOMEM...: the caller backs off
            break
        # CPython's accept4 passes SOCK_CLOEXEC only, so the new fd is blocking.
        sock.setblocking(False)
        if self._tcp and self._opts.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return PosixConnectedSocket(sock, connected=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        if self._unlink is not None and self._unlink[1] == os.getpid():
            try:
                os.unlink(self._unlink[0])
            except FileNotFoundError:
                pass


class PosixStack(NetworkStack):
    """TCP over IPv4/IPv6 (``("host", port)``) and Unix stream sockets (a path string;
    a leading ``"\\0"`` selects the abstract namespace, unix(7))."""

    name = "posix"
    passes_fds = True

    def adopt_connection(self, fd: int) -> PosixConnectedSocket:
        return PosixConnectedSocket.from_fd(fd)

    def adopt_listener(self, fd: int, opts: SocketOptions) -> PosixServerSocket:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return PosixServerSocket(sock, opts)

    def listen(self, addr: Address, opts: SocketOptions = SocketOptions()) -> PosixServerSocket:  # noqa: B008
        """Bind and listen (non-blocking, close-on-exec); OSError such as EADDRINUSE.

        A filesystem Unix path must not exist yet; :meth:`PosixServerSocket.close`
        removes it again (in the binding process only).
        """
        family, sockaddr = _resolve(addr)
        sock = _new_socket(family)
        try:
            if opts.reuseaddr and family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if opts.reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # ("::", port) serves IPv6 only, never a surprise dual-stack listener.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if family in _TCP_FAMILIES and opts.nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _apply_buffers(sock, opts)  # inherited by accepted sockets (tcp(7), socket(7))
            sock.bind(sockaddr)
            sock.listen(opts.backlog)
        except BaseException:
            sock.close()
            raise
        path = sockaddr if family == socket.AF_UNIX and not sockaddr.startswith("\0") else None
        return PosixServerSocket(sock, opts, unlink_path=path)

    def connect(self, addr: Address, opts: SocketOptions = SocketOptions()) -> PosixConnectedSocket:  # noqa: B008
        """Start a non-blocking connect; finish it with WRITABLE + :meth:`is_connected`.

        Errors known at once raise here: FileNotFoundError/ConnectionRefusedError for a
        Unix path nobody serves, BlockingIOError (EAGAIN) when a Unix listener's backlog
        is full. TCP errors (ECONNREFUSED...) surface from ``is_connected``.
        """
        family, sockaddr = _resolve(addr)
        sock = _new_socket(family)
        try:
            if family in _TCP_FAMILIES and opts.nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _apply_buffers(sock, opts)
            err = sock.connect_ex(sockaddr)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, f"{os.strerror(err)}: {addr!r}")
        except BaseException:
            sock.close()
            raise
        return PosixConnectedSocket(sock, connected=(err == 0))
