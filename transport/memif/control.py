"""memif control channel: 128-byte datagrams over AF_UNIX SOCK_SEQPACKET, at most one fd each.

See shared/notes/memif.md §3.2–3.4 (DPDK ``memif_socket.c``: ``memif_msg_send``,
``memif_msg_receive``). Addresses: a string starting with NUL or ``@`` names the abstract
namespace (DPDK's default since 20.11: NUL + path, exactly that length, no trailing NULs);
anything else is a filesystem path.
"""

from __future__ import annotations

import array
import os
import socket

from ..errors import FdPassError
from . import wire

__all__ = ["sockaddr", "is_abstract", "send_msg", "recv_msg", "MemifDisconnected"]

# Room for a few fds (more than one is a protocol error we want to see, not truncate)
# plus SCM_CREDENTIALS (struct ucred, 12 bytes): servers set SO_PASSCRED as DPDK does.
_FD_SPACE = socket.CMSG_SPACE(4 * 4) + socket.CMSG_SPACE(12)
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)


class MemifDisconnected(ConnectionResetError):
    """The peer sent DISCONNECT (``reason`` holds its text) or closed the control socket."""

    def __init__(self, reason: str, code: int = 0) -> None:
        super().__init__(f"memif peer disconnected: {reason}")
        self.reason = reason
        self.code = code


def is_abstract(addr: str) -> bool:
    return addr.startswith("\0") or addr.startswith("@")


def sockaddr(addr: str) -> str | bytes:
    """The address to pass to bind/connect: abstract names become NUL + name (no padding)."""
    if addr.startswith("@"):
        return "\0" + addr[1:]
    return addr


def send_msg(sock: socket.socket, msg: wire.Message, fd: int | None = None) -> None:
    """Send one message (with ``fd`` by SCM_RIGHTS); the socket buffer never fills in
    lock-step use, so EAGAIN here is a broken peer and surfaces as BlockingIOError."""
    data = wire.pack(msg)
    if fd is None:
        sock.send(data)
    else:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def recv_msg(sock: socket.socket) -> tuple[wire.Message, int | None]:
    """Receive one message and its fd (owned by the caller); BlockingIOError if none.

    Raises :class:`MemifDisconnected` on EOF, :class:`wire.WireError` on a malformed
    message, :class:`FdPassError` on truncated control data or more than one fd (any fds
    that did arrive are closed first, so nothing leaks).
    """
    data, ancdata, flags, _ = sock.recvmsg(wire.MSG_SIZE + 1, _FD_SPACE, _CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    try:
        if not data and not fds:
            raise MemifDisconnected("control socket closed")
        if flags & socket.MSG_CTRUNC:
            raise FdPassError(0, "control data truncated (MSG_CTRUNC)")
        if len(fds) > 1:
            raise FdPassError(0, f"{len(fds)} fds in one memif message, at most 1 allowed")
        if flags & socket.MSG_TRUNC:
            raise wire.WireError("invalid message size (datagram longer than 128 bytes)")
        msg = wire.unpack(data)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return msg, (fds[0] if fds else None)
