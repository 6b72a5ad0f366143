"""Exit statuses of the pool's processes, in one enum so no two reasons share a value."""

from __future__ import annotations

import enum
import signal

__all__ = ["ExitCode", "describe_exit"]


class ExitCode(enum.IntEnum):
    OK = 0
    #: the supervisor could not start (address in use, admin socket taken, ...)
    ERROR = 1
    #: bad command line or configuration (argparse uses 2 as well)
    USAGE = 2
    #: the supervisor's status when no worker can be kept alive (all slots FAILED)
    NO_WORKERS = 3
    #: a worker whose app could not be created or started (before READY). gunicorn uses
    #: 3 for this; here 3 is the supervisor's NO_WORKERS, and the two must stay apart so
    #: ``describe_exit`` never has to guess which one it sees.
    BOOT_ERROR = 4


def describe_exit(code: int) -> str:
    """A worker's exit as ``waitstatus_to_exitcode`` gives it, in words for the log."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"boot error (status {code})" if code == ExitCode.BOOT_ERROR else f"status {code}"
