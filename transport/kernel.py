"""The stack for code that moves sockets between processes (the pool's supervisor and
workers): kernel fds are what SCM_RIGHTS can pass, so that code asks for this stack
instead of naming the posix classes. Only the posix stack passes fds today."""

from __future__ import annotations

from transport.posix import PosixStack
from transport.stack import NetworkStack

__all__ = ["fd_stack"]


def fd_stack() -> NetworkStack:
    """A stack whose ``passes_fds`` is true (its sockets are plain kernel fds)."""
    return PosixStack()
