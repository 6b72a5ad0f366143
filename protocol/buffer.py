"""The one "bytes-like" alias of protocol/: what every codec takes and hands out."""

from __future__ import annotations

__all__ = ["Buffer"]

Buffer = bytes | bytearray | memoryview
