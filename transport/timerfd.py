"""A one-shot CLOCK_MONOTONIC timerfd through libc (``os.timerfd_*`` is Python 3.13+).

Stacks whose readiness is an fd (memif's retransmit and delayed-ACK timer, softverbs'
RNR retry timer) put it in their epoll set so a deadline makes them readable.
"""

from __future__ import annotations

import ctypes
import os
import time

__all__ = ["TimerFd"]

_CLOCK_MONOTONIC = 1


class _Itimerspec(ctypes.Structure):
    _fields_ = [("i_sec", ctypes.c_long), ("i_nsec", ctypes.c_long),
                ("v_sec", ctypes.c_long), ("v_nsec", ctypes.c_long)]


_libc: ctypes.CDLL | None = None


class TimerFd:
    """Readable once armed time has passed; :meth:`clear` before waiting again."""

    def __init__(self) -> None:
        global _libc
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fd = _libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd: int = fd
        #: CLOCK_MONOTONIC time the timer was last armed to fire at (0 = never armed)
        self.armed_until = 0.0
        # One spec and one bound function: arming is on hot paths (delayed ACK, RTO).
        self._spec = _Itimerspec(0, 0, 0, 0)
        self._ref = ctypes.byref(self._spec)
        settime = _libc.timerfd_settime
        settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        settime.restype = ctypes.c_int
        self._settime = settime

    def arm(self, delay: float) -> None:
        """Fire once after ``delay`` seconds (at least 1 µs: a zero value disarms)."""
        if delay < 1e-6:
            delay = 1e-6
        sec = int(delay)
        spec = self._spec
        spec.v_sec = sec
        spec.v_nsec = int((delay - sec) * 1e9) or 1
        if self._settime(self.fd, 0, self._ref, None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        self.armed_until = time.monotonic() + delay

    def clear(self) -> None:
        """Consume the expiry count (no-op when not expired)."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
