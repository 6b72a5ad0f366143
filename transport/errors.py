"""Transport error vocabulary (trio's naming): what went wrong moving bytes or fds."""

from __future__ import annotations

import errno as _errno

__all__ = [
    "TransportError",
    "ClosedResourceError",
    "BrokenResourceError",
    "BusyResourceError",
    "FdPassError",
]


class TransportError(OSError):
    """A transport operation failed; ``errno`` says why where the kernel told us."""


class ClosedResourceError(TransportError):
    """The object was closed by this process and can no longer be used."""

    def __init__(self, what: str = "resource") -> None:
        super().__init__(_errno.EBADF, f"{what} is closed")


class BrokenResourceError(TransportError):
    """The peer went away or the channel broke (reset, EOF mid-message, dead process)."""


class BusyResourceError(TransportError):
    """Another operation already uses this resource (e.g. a second reader on one ring)."""


class FdPassError(TransportError):
    """Passing descriptors over SCM_RIGHTS failed (truncation, bad header, wrong count)."""
