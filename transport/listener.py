"""The accept loop: a listening socket driven by an EventCenter, with EMFILE back-off.

Facts (supervisors.md §2.3):

* A level-triggered listener whose queue is non-empty stays readable. When ``accept``
  fails with EMFILE, ENFILE, ENOBUFS or ENOMEM the connection stays queued, so retrying
  at once spins the loop at 100 % CPU. asyncio removes the reader and re-arms after
  ``ACCEPT_RETRY_DELAY`` (``Lib/asyncio/selector_events.py``), trio sleeps 100 ms
  (``trio/_highlevel_serve_listeners.py``), actix 500 ms (``accept.rs``). We unregister
  READABLE, count a back-off, and re-register on a timer.
* Accepts per wake-up are bounded (``max_per_wakeup``) so a connection storm cannot
  starve the other fds of the worker; level triggering brings us back next iteration.

Call grammar: ``AcceptLoop(...) -> start -> (pause -> resume)* -> close``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .event_center import READABLE, EventCenter
from .stack import ConnectedSocket, ServerSocket

__all__ = ["CAPACITY_ERRNOS", "AcceptLoop", "AcceptStatistics"]

logger = logging.getLogger("transport.listener")

#: accept(2) errors that mean "this process/system is out of something", not "this
#: connection is bad": back off instead of retrying at once.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True)
class AcceptStatistics:
    accepted: int
    #: times the listener was unregistered and re-armed on a timer
    backoffs: int
    #: back-offs caused by errors other than the capacity errors (logged)
    errors: int
    paused: bool
    backing_off: bool


class AcceptLoop:
    """Accept connections from ``server`` on ``center`` and hand each to ``on_accept``.

    ``on_accept`` owns the socket it is given; if it raises, the error is logged and the
    socket closed. Owner thread of ``center`` only. ``close`` stops accepting but does
    not close ``server``.
    """

    def __init__(self, center: EventCenter, server: ServerSocket,
                 on_accept: Callable[[ConnectedSocket], None], *,
                 max_per_wakeup: int = 64, backoff: float = 0.1) -> None:
        if max_per_wakeup < 1:
            raise ValueError("max_per_wakeup must be >= 1")
        if backoff <= 0:
            raise ValueError("backoff must be > 0")
        self._center = center
        self._server = server
        self._fd = server.fileno()
        self._on_accept = on_accept
        self._max = max_per_wakeup
        self._backoff = backoff
        self._registered = False
        self._started = False
        self._paused = False
        self._closed = False
        self._timer: int | None = None
        self._accepted = 0
        self._backoffs = 0
        self._errors = 0

    def start(self) -> None:
        """Begin accepting (registers READABLE)."""
        if self._closed:
            raise RuntimeError("AcceptLoop is closed")
        self._started = True
        self._arm()

    def pause(self) -> None:
        """Stop accepting; queued connections wait in the kernel backlog."""
        self._paused = True
        self._cancel_timer()
        self._disarm()

    def resume(self) -> None:
        """Accept again after :meth:`pause` (immediately, even if a back-off was due)."""
        self._paused = False
        self._arm()

    def close(self) -> None:
        """Stop for good; idempotent. The server socket stays open (the caller owns it)."""
        if self._closed:
            return
        self._closed = True
        self._cancel_timer()
        self._disarm()

    def statistics(self) -> AcceptStatistics:
        return AcceptStatistics(accepted=self._accepted, backoffs=self._backoffs,
                                errors=self._errors, paused=self._paused,
                                backing_off=self._timer is not None)

    # -- internals ---------------------------------------------------------------------

    def _arm(self) -> None:
        if self._registered or self._closed or self._paused or not self._started \
                or self._timer is not None:
            return
        self._center.create_file_event(self._fd, READABLE, self._on_readable)
        self._registered = True

    def _disarm(self) -> None:
        if self._registered:
            self._center.delete_file_event(self._fd, READABLE)
            self._registered = False

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._center.delete_time_event(self._timer)
            self._timer = None

    def _back_off(self) -> None:
        self._backoffs += 1
        self._disarm()
        self._cancel_timer()
        self._timer = self._center.create_time_event(self._backoff, self._rearm)

    def _rearm(self) -> None:
        self._timer = None
        self._arm()

    def _on_readable(self, _fd: int) -> None:
        accept = self._server.accept
        for _ in range(self._max):
            if not self._registered:  # on_accept paused or closed us
                return
            try:
                sock = accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    # Unexpected (EBADF, EINVAL...): it may well persist, and a
                    # level-triggered retry would spin, so it backs off too.
                    self._errors += 1
                    logger.error("accept on %r failed: %s; retrying in %.3fs",
                                 self._server, exc, self._backoff)
                else:
                    logger.warning("accept on %r: %s; backing off %.3fs",
                                   self._server, exc, self._backoff)
                self._back_off()
                return
            if sock is None:
                return
            self._accepted += 1
            try:
                self._on_accept(sock)
            except Exception:
                logger.exception("on_accept callback failed; closing %r", sock)
                sock.close()
