"""Banner feature bits and entity types (msgr2 banner and HELLO)."""

from __future__ import annotations

import enum

__all__ = ["COMPRESSION", "REQUIRED", "REVISION_1", "SUPPORTED", "EntityType"]

#: msgr2.1 framing (inline seg0 crc, 13-byte epilogue). Both sides use rev1 iff both set it.
REVISION_1 = 1 << 0
#: On-wire compression negotiation (not implemented; never advertised).
COMPRESSION = 1 << 1
#: What this implementation advertises in its banner.
SUPPORTED = REVISION_1
#: What this implementation demands from the peer's banner.
REQUIRED = 0


class EntityType(enum.IntEnum):
    """Ceph entity types as sent in HELLO (bit values, as in ``CEPH_ENTITY_TYPE_*``)."""

    MON = 1
    MDS = 2
    OSD = 4
    CLIENT = 8
    MGR = 16
