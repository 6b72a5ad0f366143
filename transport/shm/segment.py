"""Shared-memory segments for rings: a named POSIX segment (posix_ipc) or a memfd.

Only the owner (the supervisor) creates and unlinks named segments; workers ``attach``.
Names come from :mod:`transport.shmname` (``/<prefix>.<owner pid>.<tag>``) so a starting
supervisor can ``sweep_dead()`` what a SIGKILLed predecessor left in ``/dev/shm``. A memfd
has no name at all: the kernel frees it when the last fd and mapping go away, so it cannot
leak even after SIGKILL; share it with SCM_RIGHTS and ``from_memfd``.

Creation pre-allocates every page with ``posix_fallocate`` (tmpfs supports fallocate
since Linux 3.5), so running out of ``/dev/shm`` is ENOSPC here, at start-up, instead of
SIGBUS on first touch in a hot path. The mapping uses ``MAP_POPULATE`` so the hot path
takes no minor faults either.

We never let ``multiprocessing``'s resource tracker see these segments: it may unlink a
segment other processes still use (CPython gh-82300).
"""

from __future__ import annotations

import mmap
import os
from typing import Self

import posix_ipc

from .. import shmname

__all__ = ["Segment"]

_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


class Segment:
    """A shared mapping. ``buf`` is a writable memoryview of the whole mapping."""

    __slots__ = ("_mm", "_owner", "buf", "fd", "name", "size")

    name: str | None
    fd: int
    size: int
    buf: memoryview

    def __init__(self, name: str | None, fd: int, size: int, owner: bool) -> None:
        self.name = name
        self.fd = fd
        self.size = size
        self._owner = owner
        self._mm: mmap.mmap | None = mmap.mmap(fd, size, _MAP_FLAGS, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = memoryview(self._mm)

    @staticmethod
    def _prefault(fd: int, size: int) -> None:
        if size <= 0:
            raise ValueError(f"segment size must be positive, not {size}")
        os.posix_fallocate(fd, 0, size)

    @classmethod
    def create(cls, tag: str, size: int) -> Segment:
        """Create ``/<prefix>.<pid>.<tag>`` exclusively (O_EXCL) and pre-fault it."""
        name = shmname.segment_name(tag)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
        try:
            # Own a dup of the fd (Python fds are non-inheritable, PEP 446) and let
            # posix_ipc forget its own, so exactly one close happens.
            fd = os.dup(shm.fd)
        finally:
            shm.close_fd()
        try:
            cls._prefault(fd, size)
            return cls(name, fd, size, owner=True)
        except BaseException:
            os.close(fd)
            try:
                posix_ipc.unlink_shared_memory(name)
            except posix_ipc.ExistentialError:
                pass
            raise

    @classmethod
    def attach(cls, name: str) -> Segment:
        """Map an existing named segment (its size is the file's size)."""
        shm = posix_ipc.SharedMemory(name)
        try:
            fd = os.dup(shm.fd)
        finally:
            shm.close_fd()
        try:
            size = os.fstat(fd).st_size
            return cls(name, fd, size, owner=False)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create_memfd(cls, size: int, tag: str = "ring") -> Segment:
        """An anonymous memfd segment (``memfd_create(2)``, MFD_CLOEXEC); cannot leak."""
        fd = os.memfd_create(f"amsgr-{tag}", os.MFD_CLOEXEC)
        try:
            cls._prefault(fd, size)
            return cls(None, fd, size, owner=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_memfd(cls, fd: int, size: int) -> Segment:
        """Map a memfd received over SCM_RIGHTS; the new object owns ``fd``."""
        actual = os.fstat(fd).st_size
        if actual < size:
            raise ValueError(f"memfd is {actual} bytes, {size} expected")
        return cls(None, fd, size, owner=False)

    def unlink(self) -> None:
        """Remove the name from /dev/shm (owner only; no-op for memfds). Mappings stay
        valid until closed: shm_unlink only drops the name (``shm_unlink(3)``)."""
        if self.name is None:
            return
        if not self._owner:
            raise PermissionError(f"{self.name}: only the creating process unlinks a segment")
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def close(self) -> None:
        """Drop this process's mapping and fd; idempotent.

        If views of ``buf`` are still alive (a Ring not closed, drained records still
        held), the mmap cannot be closed yet (BufferError); it is then unmapped when the
        last view is garbage-collected, and its private fd with it.
        """
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        mm, self._mm = self._mm, None
        if mm is not None:
            self.buf.release()
            try:
                mm.close()
            except BufferError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._owner:
            self.unlink()
