"""CRC-32C with Ceph's raw ``ceph_crc32c`` semantics.

Ceph's ``ceph_crc32c(seed, data, len)`` applies no pre- or post-inversion: the seed is
the register's initial value and the register is returned as is. msgr2 uses seed 0 for
the preamble and seed 0xFFFFFFFF (``bufferlist::crc32c(-1)``) for segments. The
``crc32c`` package computes the *finalised* form (register initialised to ``~value``,
result inverted), so raw = ``finalised(data, seed ^ ~0) ^ ~0``.
"""

from __future__ import annotations

import crc32c as _crc32c

__all__ = ["MASK32", "crc32c"]

MASK32 = 0xFFFFFFFF
_finalised = _crc32c.crc32c


def crc32c(data: bytes | bytearray | memoryview, seed: int) -> int:
    """Raw CRC-32C (Castagnoli) of ``data`` starting from register value ``seed``."""
    return int(_finalised(data, seed ^ MASK32)) ^ MASK32
