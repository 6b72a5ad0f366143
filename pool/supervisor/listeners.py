"""The supervisor's listening sockets in both accept modes, bound or inherited from systemd.

* ``processor`` mode: the supervisor accepts on every listener (one bound ``--bind``
  socket, or each socket systemd passed) through one :class:`AcceptGroup`.
* ``reuseport`` mode, bound: :class:`pool.supervisor.listener_slots.ListenerSlots`, one
  ``SO_REUSEPORT`` listener per worker slot.
* ``reuseport`` mode, inherited: systemd bound the socket, so there is no reuseport group
  to join (its members must be bound by the same user with the option set before bind,
  socket(7)). :class:`SharedListeners` gives every worker every inherited socket; the
  workers still accept themselves, from one shared queue (gunicorn's model). The
  supervisor keeps its copies, so no worker exit closes a socket systemd gave us.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pool.control.messages import ControlMessage, Start
from transport.event_center import EventCenter
from transport.kernel import fd_stack
from transport.listener import AcceptLoop, AcceptStatistics
from transport.stack import ConnectedSocket, ServerSocket, SocketOptions

from .listener_slots import ListenerSlots

__all__ = ["AcceptGroup", "SharedListeners", "address_of", "adopt_listeners"]

BACKLOG = 1024


def adopt_listeners(fds: Sequence[int]) -> list[ServerSocket]:
    """ServerSockets over inherited listening fds (already validated by the CLI)."""
    stack = fd_stack()
    return [stack.adopt_listener(fd, SocketOptions(backlog=BACKLOG)) for fd in fds]


def address_of(server: ServerSocket) -> tuple[str, int]:
    """``(host, port)``; a Unix listener is reported as ``(path, 0)``."""
    addr = server.address
    if isinstance(addr, tuple):
        return (str(addr[0]), int(addr[1]))
    return (str(addr), 0)


class AcceptGroup:
    """One :class:`AcceptLoop` per listener, steered as one (pause, resume, close)."""

    def __init__(self, center: EventCenter, servers: Sequence[ServerSocket],
                 on_accept: Callable[[ConnectedSocket], None]) -> None:
        self.loops = [AcceptLoop(center, s, on_accept) for s in servers]

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    def pause(self) -> None:
        for loop in self.loops:
            loop.pause()

    def resume(self) -> None:
        for loop in self.loops:
            loop.resume()

    def close(self) -> None:
        for loop in self.loops:
            loop.close()

    def statistics(self) -> AcceptStatistics:
        stats = [loop.statistics() for loop in self.loops]
        return AcceptStatistics(accepted=sum(s.accepted for s in stats),
                                backoffs=sum(s.backoffs for s in stats),
                                errors=sum(s.errors for s in stats),
                                paused=all(s.paused for s in stats),
                                backing_off=any(s.backing_off for s in stats))


class SharedListeners(ListenerSlots):
    """reuseport mode over inherited sockets: every worker polls every listener."""

    def __init__(self, servers: Sequence[ServerSocket], send: Callable[[int, ControlMessage], None],
                 log: Callable[[str], None]) -> None:
        # No bind here: the base class's listeners table is filled with what we inherited.
        self.send = send
        self.log = log
        self.listeners = dict(enumerate(servers))
        self.owner = {}
        self.accepting: set[int] = set()
        self.address = address_of(servers[0])

    def listener(self, lid: int) -> ServerSocket:
        return self.listeners[lid]

    def start_message(self, slot: int) -> Start:
        lids = sorted(self.listeners)
        return Start([self.listeners[lid].fileno() for lid in lids], lids)

    def on_accepting(self, slot: int) -> None:
        self.accepting.add(slot)

    def rehome(self, slot: int, survivors: dict[int, int]) -> None:
        # Nothing moves: each survivor already polls every listener, and with none the
        # supervisor's copies keep the queue open until a worker accepts again.
        self.accepting.discard(slot)

    def owned_by(self, slot: int) -> list[int]:
        return sorted(self.listeners) if slot in self.accepting else []
