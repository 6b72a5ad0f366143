"""The stack factory: a :class:`~transport.stack.NetworkStack` by its command-line name.

Callers above transport/ (the messenger, the pool, the tools) name a stack only by
string; the concrete classes are imported here, lazily, so that choosing ``posix``
never imports the memif or verbs code.
"""

from __future__ import annotations

from dataclasses import replace

from .stack import NetworkStack

__all__ = ["STACK_NAMES", "MEMIF_MODES", "make_stack"]

STACK_NAMES = ("posix", "dpdk", "rdma")
MEMIF_MODES = ("interrupt", "poll")


def make_stack(name: str, *, memif_mode: str = "interrupt") -> NetworkStack:
    """The NetworkStack called ``name`` (posix, dpdk = memif, rdma).

    ``memif_mode`` ``poll`` busy-polls each memif connection on the center the stack is
    bound to (no kicks, no syscalls per message; a core per polling process),
    ``interrupt`` sleeps on eventfd kicks. A Messenger binds its stack to its center
    (``bind_center``).
    """
    if memif_mode not in MEMIF_MODES:
        raise ValueError(f"unknown memif mode {memif_mode!r}: choose interrupt or poll")
    if name == "posix":
        from .posix import PosixStack
        return PosixStack()
    if name == "dpdk":
        from .memif import MemifStack, StackConfig
        cfg = StackConfig()
        return MemifStack(replace(cfg, memif=replace(cfg.memif, interrupt=memif_mode != "poll")))
    if name == "rdma":
        from .rdma import RdmaStack
        return RdmaStack()
    raise ValueError(f"unknown stack {name!r}: choose posix, dpdk or rdma")
