"""systemd integration without libsystemd: socket activation and ``sd_notify``.

Facts (``sd_listen_fds(3)``, ``sd_notify(3)``, ``systemd.service(5)``):

* **Socket activation.** systemd (or ``systemd-socket-activate``) passes ``LISTEN_FDS``
  sockets starting at fd 3 (``SD_LISTEN_FDS_START``), says which process they are for in
  ``LISTEN_PID`` and may name them in ``LISTEN_FDNAMES`` (colon-separated). The fds come
  without ``FD_CLOEXEC``; we set it, and unset the variables, so neither workers nor
  anything they run believe the sockets are theirs.
* **Notification.** ``NOTIFY_SOCKET`` is an ``AF_UNIX`` datagram socket path; a leading
  ``@`` means the abstract namespace (a NUL byte). Each datagram is newline-separated
  ``KEY=VALUE`` lines. ``RELOADING=1`` must be followed by ``READY=1`` when done, and for
  ``Type=notify-reload`` carry ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, microseconds).
* **Watchdog.** With ``WatchdogSec=``, ``WATCHDOG_USEC`` is set (and ``WATCHDOG_PID``,
  which must be us if present); ``WATCHDOG=1`` is due every half of that.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

__all__ = ["LISTEN_FDS_START", "ActivationError", "Notifier", "inherited_sockets", "watchdog_interval"]

LISTEN_FDS_START = 3
_ACTIVATION_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(ValueError):
    """The socket-activation environment is not usable as it stands (says why)."""


@dataclass(frozen=True)
class InheritedSocket:
    fd: int
    name: str


def inherited_sockets(env: MutableMapping[str, str] | None = None,
                      pid: int | None = None) -> list[InheritedSocket]:
    """The listening sockets systemd passed us; ``[]`` when ``LISTEN_FDS`` is unset.

    Raises :class:`ActivationError` when the variables are set but wrong: another
    process's pid, a bad count, or an fd that is not a listening stream socket.
    On success the variables are removed from ``env`` (default ``os.environ``).
    """
    env = os.environ if env is None else env
    if "LISTEN_FDS" not in env:
        return []
    pid = os.getpid() if pid is None else pid
    raw_pid, raw_n = env.get("LISTEN_PID", ""), env["LISTEN_FDS"]
    if not raw_pid.isdigit() or int(raw_pid) != pid:
        raise ActivationError(f"LISTEN_FDS is set but LISTEN_PID={raw_pid or '(unset)'} is not this "
                              f"process ({pid}): the sockets were meant for another process")
    if not raw_n.isdigit() or not 1 <= int(raw_n) <= 64:
        raise ActivationError(f"LISTEN_FDS={raw_n!r} must be a count of 1..64 sockets")
    n = int(raw_n)
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if names and len(names) != n:
        raise ActivationError(f"LISTEN_FDNAMES names {len(names)} sockets but LISTEN_FDS={n}")
    out = []
    for i in range(n):
        fd = LISTEN_FDS_START + i
        _check_listener(fd)
        os.set_inheritable(fd, False)
        out.append(InheritedSocket(fd, names[i] if names else f"fd{fd}"))
    for var in _ACTIVATION_VARS:
        env.pop(var, None)
    return out


def _check_listener(fd: int) -> None:
    try:
        s = socket.socket(fileno=fd)  # reads family/type from the fd itself
    except OSError as exc:
        raise ActivationError(f"inherited fd {fd} (LISTEN_FDS) is not a socket: {exc.strerror}") from None
    try:
        kind = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        family = s.family
    finally:
        s.detach()  # the fd stays ours, open
    if kind != socket.SOCK_STREAM or not listening:
        what = "a datagram socket" if kind == socket.SOCK_DGRAM else (
            "a stream socket that is not listening" if kind == socket.SOCK_STREAM else f"socket type {kind}")
        raise ActivationError(f"inherited fd {fd} is {what}: the pool serves listening stream "
                              "sockets (ListenStream= in the .socket unit)")
    if family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        raise ActivationError(f"inherited fd {fd} has address family {family}, not TCP or Unix")


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid is not None and wpid != str(os.getpid() if pid is None else pid):
        return None  # the watchdog is some other process's duty
    return int(usec) / 2e6


class Notifier:
    """``sd_notify`` over ``$NOTIFY_SOCKET``; every call is a no-op without one.

    Sending never raises: a missing or full notification socket must not stop a pool.
    """

    def __init__(self, path: str | None = None) -> None:
        path = os.environ.pop("NOTIFY_SOCKET", None) if path is None else path
        self.address: str | None = None
        self._sock: socket.socket | None = None
        self.failures = 0
        if path and path[0] in "/@":
            self.address = "\0" + path[1:] if path[0] == "@" else path
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                       | socket.SOCK_NONBLOCK)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> bool:
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError:
            self.failures += 1
            return False

    @staticmethod
    def monotonic_usec() -> str:
        return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
