"""Eventfd doorbells: the blocking half of the rings' spin-then-block wake-up.

A doorbell is a non-blocking eventfd (``eventfd(2)``, ``EFD_NONBLOCK | EFD_CLOEXEC``).
Its fd is what a worker registers READABLE in its EventCenter. ``ring()`` adds 1 to the
kernel counter and wakes any poller; ``drain()`` reads and zeroes the counter. Many rings
collapse into one wake-up, which is what we want: the woken side drains the whole ring.
"""

from __future__ import annotations

import os
import select
from typing import Self

from ..errors import ClosedResourceError

__all__ = ["Doorbell"]


class Doorbell:
    """A non-blocking eventfd owned by this object (``close()`` closes the fd)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int | None = None) -> None:
        """A new eventfd, or (``from_fd``) one received from elsewhere, now owned here."""
        if fd is None:
            # EFD_CLOEXEC: a doorbell reaches another process only on purpose (fork, or
            # SCM_RIGHTS over the control channel), never through an unrelated exec.
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            os.set_blocking(fd, False)
        self._fd = fd

    @classmethod
    def from_fd(cls, fd: int) -> Doorbell:
        """Wrap an eventfd received from elsewhere; the new object owns ``fd``."""
        return cls(fd)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ClosedResourceError("doorbell")
        return self._fd

    def ring(self) -> None:
        """Wake the other side. Never blocks: EAGAIN only means the counter is near
        2**64-1, i.e. the bell is already ringing."""
        try:
            os.eventfd_write(self._fd, 1)
        except BlockingIOError:
            pass

    def drain(self) -> int:
        """Reset the counter; return how many rings were pending (0 if none)."""
        try:
            return os.eventfd_read(self._fd)
        except BlockingIOError:
            return 0

    def wait(self, timeout: float | None) -> bool:
        """Block until rung or ``timeout`` seconds pass (None: forever); drains the bell.

        For code that has no EventCenter (tools, tests); a worker registers ``fileno()``
        in its loop instead.
        """
        p = select.poll()
        p.register(self._fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        if not p.poll(ms):
            return False
        self.drain()
        return True

    def close(self) -> None:
        """Close the eventfd; idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
