"""I/O multiplexers behind the EventCenter (Ceph's ``EventDriver``, ``EventEpoll.cc``).

The seed makes EventDriver an interface with epoll as its Linux implementation; here
:class:`EventDriver` is that interface (a Protocol), :class:`EpollDriver` the default and
:class:`SelectorsDriver` a portable fallback. Facts the drivers rely on:

* **Level-triggered epoll.** Ceph uses EPOLLET and makes every reader drain to EAGAIN.
  We use the default level-triggered mode (epoll(7), "Level-triggered and
  edge-triggered"): a callback may stop reading early (a receive throttle) without
  losing the wake-up, and the owner *unregisters* READABLE while it throttles, so a
  readable fd nobody wants to read never makes the loop spin.
* **ERR/HUP.** ``epoll_wait`` always reports EPOLLERR and EPOLLHUP even when not asked
  for (epoll_ctl(2), "EPOLLERR ... epoll_wait(2) will always wait for this event").
  Like Ceph we map them to READABLE|WRITABLE so whichever callback is registered runs
  and sees the error on its next syscall.
* **Closed fds leave the epoll set by themselves** once their last reference is closed
  (epoll(7), Q6), so :meth:`EventCenter.delete_file_event` after ``close()`` tolerates
  ENOENT/EBADF.
* **Timeout rounding.** ``epoll_wait`` and ``poll`` take milliseconds. Ceph truncated a
  sub-millisecond timer remainder to 0 and spun at 95-99 % CPU (PR #53477, tracker
  62512), so every wait is rounded *up* to whole milliseconds here, and the drivers
  take an integer. CPython then converts our float seconds back with two ceilings
  (seconds -> ns, ns -> ms in ``select.epoll.poll``; ``math.ceil(t * 1e3)`` in
  ``selectors.PollSelector``), which turns e.g. 0.009 s (9000000.000000002 ns) into
  10 ms; the drivers pass ``ms / 1000 - 1e-7`` so the kernel gets exactly ``ms``.
"""

from __future__ import annotations

import select
import selectors
from collections.abc import Callable
from typing import Protocol

__all__ = ["DRIVERS", "READABLE", "WRITABLE", "EpollDriver", "EventDriver", "SelectorsDriver",
           "default_driver"]

READABLE = 1
WRITABLE = 2


class EventDriver(Protocol):
    """What the center needs from an I/O multiplexer."""

    #: bits of a returned event mask that fire the read / the write callback
    rbits: int
    wbits: int

    def add(self, fd: int, mask: int) -> None: ...
    def modify(self, fd: int, mask: int) -> None: ...
    def remove(self, fd: int) -> None: ...
    def poll(self, timeout_ms: int, maxevents: int) -> list[tuple[int, int]]: ...
    def close(self) -> None: ...


class EpollDriver:
    """``select.epoll`` (close-on-exec: CPython passes EPOLL_CLOEXEC), level-triggered."""

    rbits = select.EPOLLIN | select.EPOLLPRI | select.EPOLLERR | select.EPOLLHUP
    wbits = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP

    def __init__(self, sizehint: int) -> None:
        self._ep = select.epoll(sizehint)

    @staticmethod
    def _bits(mask: int) -> int:
        return (select.EPOLLIN if mask & READABLE else 0) | (select.EPOLLOUT if mask & WRITABLE else 0)

    def add(self, fd: int, mask: int) -> None:
        try:
            self._ep.register(fd, self._bits(mask))
        except FileExistsError:
            # The fd number is still in the set under an older registration (a dup of a
            # closed fd keeps the epoll entry alive, epoll(7) Q6): take it over.
            self._ep.modify(fd, self._bits(mask))

    def modify(self, fd: int, mask: int) -> None:
        try:
            self._ep.modify(fd, self._bits(mask))
        except FileNotFoundError:
            # The old fd was closed without delete_file_event and this number was
            # reused: the kernel already dropped the entry, so register afresh.
            self._ep.register(fd, self._bits(mask))

    def remove(self, fd: int) -> None:
        try:
            self._ep.unregister(fd)
        except OSError:
            pass  # ENOENT/EBADF: already closed: the kernel removed it (epoll(7) Q6)

    def poll(self, timeout_ms: int, maxevents: int) -> list[tuple[int, int]]:
        # See "Timeout rounding" in the module doc for the 1e-7.
        return self._ep.poll(timeout_ms / 1000 - 1e-7 if timeout_ms > 0 else 0, maxevents)

    def close(self) -> None:
        self._ep.close()


class SelectorsDriver:
    """Portable fallback on :mod:`selectors`: poll(2) where it exists, else select(2)."""

    rbits = selectors.EVENT_READ
    wbits = selectors.EVENT_WRITE

    def __init__(self, sizehint: int) -> None:
        cls = getattr(selectors, "PollSelector", selectors.SelectSelector)
        self._sel: selectors.BaseSelector = cls()

    @staticmethod
    def _bits(mask: int) -> int:
        return (selectors.EVENT_READ if mask & READABLE else 0) | (
            selectors.EVENT_WRITE if mask & WRITABLE else 0)

    def add(self, fd: int, mask: int) -> None:
        try:
            self._sel.register(fd, self._bits(mask))
        except KeyError:
            self._sel.modify(fd, self._bits(mask))

    def modify(self, fd: int, mask: int) -> None:
        try:
            self._sel.modify(fd, self._bits(mask))
        except KeyError:
            self._sel.register(fd, self._bits(mask))

    def remove(self, fd: int) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def poll(self, timeout_ms: int, maxevents: int) -> list[tuple[int, int]]:
        timeout = timeout_ms / 1000 - 1e-7 if timeout_ms > 0 else 0
        return [(key.fd, ev) for key, ev in self._sel.select(timeout)]

    def close(self) -> None:
        self._sel.close()


DRIVERS: dict[str, Callable[[int], EventDriver]] = {
    "epoll": EpollDriver,
    "select": SelectorsDriver,
}


def default_driver() -> str:
    return "epoll" if hasattr(select, "epoll") else "select"
