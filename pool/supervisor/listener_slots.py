"""reuseport mode: the supervisor's listener slots.

Listener ``i`` is created for slot ``i`` and the supervisor keeps its own copy, so a
worker's exit is never the last close of a listener: queued connections are not reset
(supervisors.md 2.1). Whenever a slot stops accepting (drain, stall, death), its
listeners are handed to a surviving ACCEPTING worker, so no queue is left unpolled; a
new worker for slot ``i`` gets listener ``i`` back and the interim owner is then told to
drop it. With ``net.ipv4.tcp_migrate_req=1`` the kernel could migrate the queue on close
instead, but handover needs no sysctl and also covers crashes; the value is logged at
start (:func:`check_migrate_req`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pool.control.messages import ControlMessage, Listen, Start, Unlisten
from transport.kernel import fd_stack
from transport.stack import ServerSocket, SocketOptions

__all__ = ["MIGRATE_REQ", "ListenerSlots", "check_migrate_req"]

MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"

class ListenerSlots:
    """reuseport mode: listener ``i`` is made for slot ``i`` and the supervisor keeps its
    own copy of every listener, so a worker's exit is never a listener's last close and
    its queued connections are never reset (supervisors.md 2.1, granian#567).

    A listener nobody polls is worse than a closed one (connections hashed to it hang),
    so whenever a slot stops accepting its listeners go to the surviving accepting
    worker that polls the fewest (``rehome``); when slot ``i`` accepts again it gets
    listener ``i`` back and the interim owner is told to drop it (``on_accepting``).
    ``send(slot, msg)`` writes a :class:`Listen` / :class:`Unlisten` to a worker's channel.
    """

    def __init__(self, bind: tuple[str, int], send: Callable[[int, ControlMessage], None],
                 log: Callable[[str], None]) -> None:
        self.send = send
        self.log = log
        self.listeners: dict[int, ServerSocket] = {}
        self.owner: dict[int, int | None] = {}
        first = self._make(0, bind)  # fails fast on EADDRINUSE; learns the port for bind :0
        addr = first.address
        assert isinstance(addr, tuple)
        self.address: tuple[str, int] = (addr[0], addr[1])

    def _make(self, lid: int, bind: tuple[str, int]) -> ServerSocket:
        # Identical options for every member of the group: the kernel's migration
        # between listeners with different settings can break applications
        # (Documentation/networking/ip-sysctl.rst, tcp_migrate_req).
        sock = fd_stack().listen(bind, SocketOptions(reuseport=True, backlog=1024))
        self.listeners[lid] = sock
        self.owner[lid] = None
        return sock

    def listener(self, lid: int) -> ServerSocket:
        sock = self.listeners.get(lid)
        return sock if sock is not None else self._make(lid, self.address)

    def start_message(self, slot: int) -> Start:
        """The START for a new worker of ``slot``: its own listener."""
        return Start([self.listener(slot).fileno()], [slot])

    def on_accepting(self, slot: int) -> None:
        prev = self.owner.get(slot)
        self.owner[slot] = slot
        if prev is not None and prev != slot:
            self.send(prev, Unlisten(slot))  # the new owner polls it now
        for lid, owner in self.owner.items():
            if owner is None:
                self.give(lid, slot)

    def rehome(self, slot: int, survivors: dict[int, int]) -> None:
        """Hand every listener polled by ``slot`` to one of ``survivors`` (accepting)."""
        for lid, owner in list(self.owner.items()):
            if owner != slot:
                continue
            if not survivors:
                self.owner[lid] = None  # orphan until a worker accepts again
                continue
            counts = {s: sum(1 for o in self.owner.values() if o == s) for s in survivors}
            self.give(lid, min(counts, key=lambda s: (counts[s], s)))

    def give(self, lid: int, slot: int) -> None:
        self.owner[lid] = slot
        self.send(slot, Listen([self.listeners[lid].fileno()], lid))
        self.log(f"listener {lid} handed to slot {slot}")

    def owned_by(self, slot: int) -> list[int]:
        return sorted(lid for lid, o in self.owner.items() if o == slot)

    def close(self) -> None:
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()
        self.owner.clear()


def check_migrate_req(set_it: bool, log: Callable[[str], None]) -> None:
    """Log ``net.ipv4.tcp_migrate_req``; with ``set_it`` (and root) turn it on first."""
    try:
        with open(MIGRATE_REQ) as f:
            migrate = f.read().strip()
    except OSError:
        migrate = "unavailable"
    if set_it and migrate == "0" and os.geteuid() == 0:
        with open(MIGRATE_REQ, "w") as f:
            f.write("1")
        migrate = "1"
        log(f"set net.ipv4.tcp_migrate_req=1 ({MIGRATE_REQ}); this is system-wide")
    log(f"reuseport: net.ipv4.tcp_migrate_req={migrate}; a retiring slot's listener is "
        "handed to a surviving worker (the supervisor keeps every listener open)")
