"""The supervisor's signal intake, gunicorn's arbiter style (style-anchors.md §3).

Handlers only enqueue; ``signal.set_wakeup_fd`` writes to a socketpair the EventCenter
watches, so a signal that arrives while the loop sleeps in epoll_wait wakes it, and
the loop then runs ``handle_<sig>`` for everything queued.
"""

from __future__ import annotations

import signal
import socket
from collections import deque
from typing import Any

from transport.event_center import READABLE, EventCenter

__all__ = ["HANDLED", "SignalQueue"]

#: the signals the supervisor reacts to (SIGCHLD only wakes the loop: it reaps anyway)
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD,
           signal.SIGHUP)


class SignalQueue:
    """Installs the handlers on :meth:`install`; :meth:`close` restores the old ones."""

    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._old_handlers: dict[int, Any] = {}

    def install(self, center: EventCenter) -> None:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wake_r, self._wake_w = r, w
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        center.create_file_event(r.fileno(), READABLE, self._on_wakeup)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)  # only enqueue: the loop does the work

    def _on_wakeup(self, _fd: int) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(512):
                pass
        except BlockingIOError:
            pass

    def names(self) -> list[str]:
        """Queued signals as handler suffixes (``"term"``, ``"ttin"``...), oldest first;
        the queue is emptied."""
        out = []
        while self.pending:
            out.append(signal.Signals(self.pending.popleft()).name.lower()[3:])
        return out

    def close(self) -> None:
        if self._wake_w is None:
            return
        signal.set_wakeup_fd(-1)
        for sig, h in self._old_handlers.items():
            signal.signal(sig, h)
        assert self._wake_r is not None
        self._wake_r.close()
        self._wake_w.close()
        self._wake_r = self._wake_w = None
