"""Names of POSIX shared-memory segments, and the sweep of segments left by dead pools.

Every named segment is ``/<prefix>.<owner pid>.<tag>``. The prefix comes from
``ASYNCMSGR_SHM_PREFIX`` (default ``amsgr``) so a test session can tell its own segments
from anyone else's. SIGKILL skips every unlink, so a starting supervisor calls
:func:`sweep_dead` to remove segments whose owner pid no longer exists.
"""

from __future__ import annotations

import os

__all__ = ["prefix", "segment_name", "owner_of", "list_segments", "sweep_dead", "SHM_DIR"]

SHM_DIR = "/dev/shm"


def prefix() -> str:
    return os.environ.get("ASYNCMSGR_SHM_PREFIX", "amsgr")


def segment_name(tag: str, owner: int | None = None) -> str:
    """Name for a new segment owned by ``owner`` (default: this process)."""
    if "/" in tag or "." in tag:
        raise ValueError(f"segment tag {tag!r} must not contain '/' or '.'")
    return f"/{prefix()}.{owner if owner is not None else os.getpid()}.{tag}"


def owner_of(name: str) -> int | None:
    """Owner pid encoded in a segment name, or None if the name is not ours."""
    parts = name.lstrip("/").split(".")
    if len(parts) != 3 or parts[0] != prefix() or not parts[1].isdigit():
        return None
    return int(parts[1])


def list_segments() -> list[str]:
    """Our segments currently in /dev/shm, as names with a leading slash."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted("/" + e for e in entries if owner_of("/" + e) is not None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead() -> list[str]:
    """Unlink segments whose owner process is gone; return the names removed."""
    removed = []
    for name in list_segments():
        pid = owner_of(name)
        if pid is not None and not _alive(pid):
            try:
                os.unlink(SHM_DIR + name)
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed
