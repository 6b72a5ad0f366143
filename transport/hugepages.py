"""Shared memory regions on hugepages, with a plain-memfd fallback.

Facts (memfd_create(2), measured on these machines; see shared/notes/memif.md §6):

* ``memfd_create(MFD_HUGETLB)`` and ``ftruncate`` succeed even with no free hugepages;
  only ``mmap`` fails, with ENOMEM. So the fallback decision is made at ``mmap``.
* Sizes must be multiples of 2 MiB, or ``ftruncate`` fails with EINVAL and a mapping of
  an odd size cannot be unmapped (the pages stay reserved until exit).
* ``MAP_NORESERVE`` turns ENOMEM into SIGBUS on first touch: never used here.
* A memfd region disappears with its last fd and mapping: nothing can leak in a filesystem.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["HUGEPAGE_SIZE", "Region", "alloc_region", "hugepage_info", "round_up",
           "reserved_hugepages"]

log = logging.getLogger(__name__)

HUGEPAGE_SIZE = 2 * 1024 * 1024
_MFD_HUGETLB = getattr(os, "MFD_HUGETLB", 0x4)
_MFD_ALLOW_SEALING = getattr(os, "MFD_ALLOW_SEALING", 0x2)
_fallback_logged = False


def round_up(size: int, to: int = HUGEPAGE_SIZE) -> int:
    return (size + to - 1) // to * to


@dataclass
class Region:
    """A shared memory region: an fd (to pass by SCM_RIGHTS) and this process's mapping."""

    fd: int
    size: int
    hugetlb: bool
    map: mmap.mmap = field(repr=False)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            # memoryviews into the map are still alive; the mapping goes with them.
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def alloc_region(size: int, name: str = "amsgr", hugepages: bool = True) -> Region:
    """Create and map a region of at least ``size`` bytes.

    With ``hugepages`` the size is rounded up to 2 MiB and MFD_HUGETLB is tried first;
    ENOMEM (no free hugepages) falls back to a plain memfd, logged once per process.
    """
    global _fallback_logged
    if size <= 0:
        raise ValueError(f"region size must be positive, got {size}")
    if hugepages:
        hsize = round_up(size)
        fd = os.memfd_create(name, _MFD_HUGETLB | os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, hsize)
            m = mmap.mmap(fd, hsize, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            return Region(fd, hsize, True, m)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOMEM, errno.EINVAL, errno.ENOSPC):
                raise
            if not _fallback_logged:
                log.info("no free 2 MiB hugepages (%s); using plain memfd regions", err.strerror)
                _fallback_logged = True
    fd = os.memfd_create(name, os.MFD_CLOEXEC | _MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        os.close(fd)
        raise
    return Region(fd, size, False, m)


def hugepage_info() -> dict[str, int]:
    """HugePages_Total/Free/Rsvd/Surp and Hugepagesize (kB) from /proc/meminfo."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key.startswith("HugePages_") or key == "Hugepagesize":
                out[key] = int(rest.split()[0])
    return out


NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
HUGEPAGE_LOCK = "/run/lock/amsgr-hugepages.lock" if os.path.isdir("/run/lock") else "/tmp/amsgr-hugepages.lock"


@contextmanager
def reserved_hugepages(pages: int, lock_timeout: float = 120.0) -> Iterator[int]:
    """Reserve ``pages`` more 2 MiB pages for the ``with`` block, then restore the old count.

    Explicit and root-only (writes /proc/sys/vm/nr_hugepages; PermissionError otherwise).
    Yields how many pages became free (the kernel may find fewer when memory is
    fragmented). The old value is restored even on error.
    """
    # Serialise reservations machine-wide: two overlapping "read old, raise, restore old"
    # sequences (e.g. two test runs) would otherwise restore each other's raised value.
    lock = os.open(HUGEPAGE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + lock_timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"hugepage reservation lock {HUGEPAGE_LOCK} busy") from None
                time.sleep(0.05)  # another process holds the reservation: back off
        with open(NR_HUGEPAGES) as f:
            old = int(f.read())
        free_before = hugepage_info().get("HugePages_Free", 0)
        try:
            with open(NR_HUGEPAGES, "w") as f:
                f.write(str(old + pages))
            yield hugepage_info().get("HugePages_Free", 0) - free_before
        finally:
            with open(NR_HUGEPAGES, "w") as f:
                f.write(str(old))
    finally:
        os.close(lock)  # releases the flock
