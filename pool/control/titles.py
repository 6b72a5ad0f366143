"""Process titles: ``msgr supervisor`` and ``msgr worker N`` in ps/top.

``setproctitle`` (if installed) rewrites argv so ``ps -f`` shows the title; otherwise we
set the kernel's ``comm`` (``/proc/self/comm``, what ``ps -o comm``, top and pgrep see)
with ``prctl(PR_SET_NAME)``, which truncates to 15 bytes plus NUL (prctl(2)).
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["prctl", "set_title"]

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15

_libc: ctypes.CDLL | None = None


def prctl(option: int, arg: int | bytes) -> int:
    """Call prctl(2); returns its result (-1 on error, errno in ctypes.get_errno())."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return int(_libc.prctl(option, arg, 0, 0, 0))


def set_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:
        pass
    prctl(PR_SET_NAME, title.encode()[:15])
