"""msgr2 banner feature bits and entity types (HELLO). Ceph feature bits (the ones in
CLIENT_IDENT / SERVER_IDENT) are in :mod:`protocol.ceph.features`."""

from __future__ import annotations

import enum

__all__ = ["ASYNCMSGR", "COMPRESSION", "REQUIRED", "REVISION_1", "SUPPORTED", "EntityType"]

#: msgr2.1 framing (inline seg0 crc, 13-byte epilogue). Both sides use rev1 iff both set it.
REVISION_1 = 1 << 0
#: On-wire compression negotiation (not implemented; never advertised).
COMPRESSION = 1 << 1
#: Private bit: "I speak asyncmsgr's own message family" (msgpack fronts, types
#: ``protocol.message.ASYNCMSGR_TYPE_BASE`` and up). Ceph enforces only *required* banner
#: bits and ignores unknown supported ones, so announcing it costs nothing with a real
#: daemon; only a peer that sets it is ever sent asyncmsgr messages.
ASYNCMSGR = 1 << 62
#: What this implementation advertises in its banner.
SUPPORTED = REVISION_1 | ASYNCMSGR
#: What this implementation demands from the peer's banner.
REQUIRED = 0


class EntityType(enum.IntEnum):
    """Ceph entity types as sent in HELLO (bit values, as in ``CEPH_ENTITY_TYPE_*``)."""

    MON = 1
    MDS = 2
    OSD = 4
    CLIENT = 8
    MGR = 16
