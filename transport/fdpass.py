"""Passing file descriptors between processes over SOCK_SEQPACKET (SCM_RIGHTS).

Facts (supervisors.md §2.8):

* SOCK_SEQPACKET keeps message boundaries, so one ``send_fds`` is one ``recv_fds``; on
  SOCK_STREAM messages merge or split and the fds ride on whichever byte comes first.
* unix(7): ancillary data needs at least one byte of real data, hence ``data`` must be
  non-empty; a zero-length read therefore always means EOF.
* CPython's ``socket.recv_fds`` does not pass its ``flags`` through to ``recvmsg``
  (``Lib/socket.py``), so we call ``recvmsg`` with MSG_CMSG_CLOEXEC ourselves: a received
  fd is close-on-exec from the moment it exists (recvmsg(2), MSG_CMSG_CLOEXEC).
* When the receiver's control buffer is too small, or the receiver hits RLIMIT_NOFILE
  mid-way, the kernel installs the fds that fit, drops the rest and sets MSG_CTRUNC, and
  ``recvmsg`` still "succeeds" (``scm_detach_fds`` in net/core/scm.c; rr-debugger/rr
  PR #3870). Ignoring MSG_CTRUNC hands a handler a missing fd (freeunitorg/freeunit#264).
  :func:`recv_fds` closes whatever arrived and raises :class:`FdPassError` so the caller
  NAKs the message and the sender, who still owns its copies, retries elsewhere.
* ``CMSG_SPACE(n*4)`` is padded to 8 bytes, so a buffer sized for an odd ``n`` has room
  for one fd more; more than ``maxfds`` fds is treated as a protocol error too.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import Sequence

from .errors import FdPassError

__all__ = ["MAX_FDS", "recv_fds", "send_fds", "seqpacket_pair"]

#: Most descriptors one message may carry (the kernel's own cap is SCM_MAX_FD = 253).
MAX_FDS = 16

_INT_SIZE = array.array("i").itemsize
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_MSG_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


def seqpacket_pair(*, blocking: bool = True) -> tuple[socket.socket, socket.socket]:
    """A connected AF_UNIX SOCK_SEQPACKET pair, close-on-exec (inheritable only if the
    caller passes them on explicitly, e.g. via ``pass_fds``)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | getattr(socket, "SOCK_CLOEXEC", 0))
    for s in (a, b):
        s.setblocking(blocking)
    return a, b


def send_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send ``data`` and ``fds`` as one datagram; the caller keeps its copies of the fds.

    Raises ValueError for empty ``data`` or more than :data:`MAX_FDS` fds, OSError
    (BlockingIOError on a full non-blocking socket, BrokenPipeError...) from the kernel.
    """
    if not data:
        raise ValueError("send_fds needs at least one byte of data (unix(7))")
    if len(fds) > MAX_FDS:
        raise ValueError(f"at most {MAX_FDS} fds per message, got {len(fds)}")
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], ancillary, _MSG_NOSIGNAL)
    if sent != len(data):  # pragma: no cover - SEQPACKET sends are all-or-nothing
        raise FdPassError(errno.EMSGSIZE, f"short send: {sent} of {len(data)} bytes")


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_fds(sock: socket.socket, bufsize: int = 65536, maxfds: int = MAX_FDS) -> tuple[bytes, list[int]]:
    """Receive one datagram and the fds it carries (already close-on-exec).

    Returns ``(b"", [])`` at EOF. Raises :class:`FdPassError` (after closing every fd
    that did arrive) when data or fds were truncated or more than ``maxfds`` came;
    ``errno`` is EMFILE when the kernel stopped because this process ran out of fd slots,
    EMSGSIZE otherwise. BlockingIOError propagates on a non-blocking socket.
    """
    if maxfds < 0 or bufsize < 1:
        raise ValueError("bufsize must be >= 1 and maxfds >= 0")
    ancbufsize = socket.CMSG_SPACE(maxfds * _INT_SIZE) if maxfds else 0
    data, ancdata, flags, _ = sock.recvmsg(bufsize, ancbufsize, _MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % _INT_SIZE
            fds.extend(array.array("i", cdata[:usable]))
    if flags & socket.MSG_TRUNC:
        _close_all(fds)
        raise FdPassError(errno.EMSGSIZE,
                          f"fd-passing message truncated: more than {bufsize} data bytes")
    if flags & socket.MSG_CTRUNC:
        _close_all(fds)
        capacity = (ancbufsize - socket.CMSG_LEN(0)) // _INT_SIZE if ancbufsize else 0
        if len(fds) < capacity:
            # Room was left, so the kernel stopped installing fds for another reason:
            # this process is at RLIMIT_NOFILE (or the system at fs.file-max).
            raise FdPassError(errno.EMFILE, f"fds dropped by the kernel after {len(fds)} "
                              "(receiver out of descriptors; MSG_CTRUNC)")
        raise FdPassError(errno.EMSGSIZE, f"more fds than the {maxfds} expected "
                          f"(control data truncated, MSG_CTRUNC; {len(fds)} arrived and were closed)")
    if len(fds) > maxfds:
        _close_all(fds)
        raise FdPassError(errno.EMSGSIZE, f"{len(fds)} fds arrived, at most {maxfds} expected")
    return data, fds
