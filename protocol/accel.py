"""Which implementation of the per-message frame path runs: compiled or pure Python.

``protocol._accel`` (C, built by setup.py when it can be) is the compiled twin of
:func:`protocol.crc.crc32c`, :func:`protocol.frames.encode_message_frame`, the fast path
of :meth:`protocol.frames.FrameDecoder.next_message`, and the per-message batches of
:mod:`protocol.message`: ``decode_messages`` (receive), ``encode_messages`` and
``check_outgoing`` (send); the pure-Python code stays the reference (the ``*_python``
functions), and the differential tests hold the two to the same bytes and decisions. ``ASYNCMSGR_NO_EXTENSIONS=1`` forces pure Python (the
aiohttp/yarl convention); a missing build falls back and :data:`REASON` says why.
"""

from __future__ import annotations

import importlib
import os  # only os.environ: the choice is made once, at import (see the layering test)
from types import ModuleType

__all__ = ["ACCEL", "IMPLEMENTATION", "REASON", "describe"]


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("ASYNCMSGR_NO_EXTENSIONS", "") not in ("", "0"):
        return None, "ASYNCMSGR_NO_EXTENSIONS is set"
    try:
        return importlib.import_module("protocol._accel"), ""
    except ImportError as exc:
        return None, (f"the compiled extension is not built ({exc}); reinstall with a C "
                      "compiler and the Python headers (Debian: gcc python3-dev)")


#: the compiled module, or None on the pure-Python path
ACCEL, REASON = _load()
#: "compiled" or "python", for ``msgr --version`` and ``msgr perf``
IMPLEMENTATION = "compiled" if ACCEL is not None else "python"


def describe() -> str:
    """One line: the path in use and, for the fallback, why."""
    if ACCEL is not None:
        return f"compiled (protocol._accel, crc32c: {ACCEL.CRC_IMPL})"
    return f"python ({REASON})"
