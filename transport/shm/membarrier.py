"""The ring's memory-ordering prerequisites: x86-64 only, and ``membarrier(2)``.

:mod:`transport.shm.ring` explains why: TSO makes the record protocol safe without
fences, and the two sleep handshakes (Dekker's pattern) need one full barrier, which the
side about to sleep issues for everybody with ``MEMBARRIER_CMD_GLOBAL_EXPEDITED``.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable

__all__ = ["EXACT_WAKEUP", "check_arch", "full_barrier", "register_membarrier"]

_SUPPORTED_MACHINES = frozenset({"x86_64", "AMD64", "amd64"})


def check_arch() -> None:
    machine = platform.machine()
    if machine not in _SUPPORTED_MACHINES:
        raise RuntimeError(
            f"transport.shm.Ring needs x86-64 (TSO) memory ordering; this machine is "
            f"{machine!r}, where stores/loads may be reordered and a consumer could see "
            f"tail before the record bytes. No fenced ring implementation is available."
        )


_SYS_MEMBARRIER = 324  # x86-64 syscall number (arch/x86/entry/syscalls/syscall_64.tbl)
_MB_QUERY, _MB_GLOBAL_EXPEDITED, _MB_REGISTER_GLOBAL_EXPEDITED = 0, 1 << 1, 1 << 2


def _load_membarrier() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_uint, ctypes.c_int]

    def call(cmd: int) -> int:
        return int(syscall(_SYS_MEMBARRIER, cmd, 0, 0))

    try:
        supported = call(_MB_QUERY)
    except OSError:
        return None
    need = _MB_GLOBAL_EXPEDITED | _MB_REGISTER_GLOBAL_EXPEDITED
    if supported < 0 or supported & need != need:
        return None
    return call


_membarrier_call = _load_membarrier() if platform.machine() in _SUPPORTED_MACHINES else None
#: True when the sleep handshakes are exact (membarrier available): a sleeper can block
#: without a timeout. False: a lost wake-up is possible, so cap every blocking wait.
EXACT_WAKEUP = _membarrier_call is not None
_registered_pid = -1


def register_membarrier() -> None:
    """Register this process so other processes' membarriers fence its CPU too.

    Done per pid: a forked child has a new mm and must register itself.
    """
    global _registered_pid
    if (_membarrier_call is not None and _registered_pid != os.getpid()
            and _membarrier_call(_MB_REGISTER_GLOBAL_EXPEDITED) == 0):
        _registered_pid = os.getpid()


def full_barrier() -> None:
    """Full memory barrier on this CPU and on every CPU running a registered process."""
    if _membarrier_call is not None:
        _membarrier_call(_MB_GLOBAL_EXPEDITED)
