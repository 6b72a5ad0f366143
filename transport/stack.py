"""The network-stack interface every backend implements (Ceph's ``Stack.h``).

A stack makes :class:`ServerSocket` and :class:`ConnectedSocket` objects. Sockets are
non-blocking and driven by an :class:`~transport.event_center.EventCenter`: the owner
registers :meth:`ConnectedSocket.fileno` for READABLE and, while output is pending,
:meth:`ConnectedSocket.write_fileno` for WRITABLE.

Readiness contract (all stacks):

* ``fileno()`` becomes readable when ``read_into`` may return data or EOF. Spurious
  wake-ups are allowed; ``read_into`` then raises :class:`BlockingIOError`.
* ``write_fileno()`` returns an fd that becomes writable when ``send`` may accept more,
  or ``None``: the stack then makes ``fileno()`` readable when send space frees up
  (memif and rdma use one eventfd for both directions).
* ``send`` accepts a sequence of bytes-like buffers, returns how many bytes it took
  (possibly fewer than offered) and raises :class:`BlockingIOError` when it took none.
* Errors are :class:`OSError` (``ConnectionResetError``, ``BrokenPipeError``...);
  ``read_into`` returning 0 means orderly EOF.

Call grammar: ``connect -> [is_connected()==0]* -> is_connected()==1 -> (read_into|send)*
-> [shutdown] -> close``. ``close`` is idempotent.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from .event_center import EventCenter

__all__ = ["Address", "Buffer", "ConnectedSocket", "ServerSocket", "NetworkStack", "SocketOptions"]

#: ("host", port) for TCP, a filesystem or abstract ("\0name") path for Unix sockets,
#: a stack-specific string for memif/rdma endpoints.
Address = Union[tuple[str, int], str]
Buffer = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class SocketOptions:
    """Options applied identically to every socket a stack creates."""

    nodelay: bool = True
    reuseaddr: bool = True
    reuseport: bool = False
    backlog: int = 512
    rcvbuf: int = 0  # 0 = kernel default
    sndbuf: int = 0


class ConnectedSocket(abc.ABC):
    """A full-duplex byte stream between two endpoints.

    Capabilities are class attributes that the messenger reads instead of testing the
    concrete class: ``can_detach_fd`` says :meth:`detach` yields a kernel fd that another
    process can adopt (SCM_RIGHTS); ``write_fileno() is None`` says the stack reports
    send space on ``fileno()`` itself.
    """

    #: True where :meth:`detach` hands over a kernel socket (posix); memif and rdma
    #: connections live in this process's memory and verbs context and cannot move.
    can_detach_fd: bool = False

    @abc.abstractmethod
    def fileno(self) -> int:
        """fd to register READABLE (and WRITABLE when ``write_fileno`` returns it)."""

    def write_fileno(self) -> int | None:
        """fd to poll for WRITABLE while output is pending, or None (see module doc)."""
        return self.fileno()

    @abc.abstractmethod
    def is_connected(self) -> int:
        """1 when established, 0 while a non-blocking connect is pending; raises on failure."""

    @abc.abstractmethod
    def read_into(self, buf: memoryview) -> int:
        """Read up to ``len(buf)`` bytes; 0 = EOF; raises BlockingIOError or OSError."""

    @abc.abstractmethod
    def send(self, buffers: Sequence[Buffer]) -> int:
        """Send from the buffers in order; returns bytes taken; BlockingIOError if none."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Shut both directions down; the next I/O on either side fails or sees EOF."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the socket; idempotent."""

    def detach(self) -> int:
        """Give up ownership and return the kernel fd (for handoff to another process).

        Only stacks whose connections are kernel sockets support this.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be handed to another process")

    @property
    def peer_address(self) -> Address | None:
        return None

    @property
    def local_address(self) -> Address | None:
        return None


class ServerSocket(abc.ABC):
    """A listening endpoint."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """fd that becomes readable when ``accept`` may return a connection."""

    @abc.abstractmethod
    def accept(self) -> ConnectedSocket | None:
        """One pending connection, or None when none is queued (EAGAIN)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop listening; idempotent."""

    @property
    @abc.abstractmethod
    def address(self) -> Address:
        """The bound address (with the real port when 0 was asked for)."""


class NetworkStack(abc.ABC):
    """Factory for sockets of one backend."""

    name: str = "abstract"
    #: whether this stack's sockets are plain kernel fds that another process can adopt
    #: (SCM_RIGHTS handoff, the Processor, reuseport listener slots): then
    #: :meth:`adopt_connection` and :meth:`adopt_listener` work
    passes_fds: bool = False

    def adopt_connection(self, fd: int) -> ConnectedSocket:
        """Own an established connection's fd (received from another process)."""
        raise NotImplementedError(f"the {self.name} stack cannot adopt a connection fd")

    def adopt_listener(self, fd: int, opts: SocketOptions) -> ServerSocket:
        """Own a listening socket's fd (received from another process), non-blocking."""
        raise NotImplementedError(f"the {self.name} stack cannot adopt a listener fd")

    def bind_center(self, center: EventCenter) -> None:
        """Tell the stack which EventCenter runs its sockets (the Messenger does). Only
        busy-polled stacks need it (memif poll mode adds a poller per connection)."""

    @abc.abstractmethod
    def listen(self, addr: Address, opts: SocketOptions = SocketOptions()) -> ServerSocket:
        """Bind and listen; raises OSError (EADDRINUSE...) on failure."""

    @abc.abstractmethod
    def connect(self, addr: Address, opts: SocketOptions = SocketOptions()) -> ConnectedSocket:
        """Start a non-blocking connect; poll ``is_connected`` (after WRITABLE) to finish."""
