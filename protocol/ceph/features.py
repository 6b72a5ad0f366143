"""Ceph feature bits (the le64 ``supported``/``required`` of CLIENT_IDENT / SERVER_IDENT).

These are *Ceph's* feature bits, distinct from the msgr2 banner bits in
:mod:`protocol.features`. Many low bits were retired and reused by later releases, so a
bit's meaning depends on the peer's release; the table names the incarnation Pacific
(16.2) gives each bit we rely on.

Facts observed against a real ceph-mon 16.2.15 (``notes/msgr2-wire.md``):

- a Pacific daemon advertises :data:`PACIFIC_ALL` = ``0x3f01cfbdfffdffff``;
- a mon answered IDENT_MISSING_FEATURES ``0x0c01020002040000`` to a client that
  advertised only banner bits: that is :data:`MON_CLIENT_REQUIRED`, bits 18, 25, 41, 48,
  58 and 59 (:data:`MSG_ADDR2`);
- MSG_ADDR2 (bit 59) is what makes addresses travel as entity_addr_t with a marker byte,
  which is the only address encoding asyncmsgr speaks.

We advertise the whole Pacific set: feature bits only change how per-type message bodies
are encoded, and the bodies asyncmsgr encodes itself (:mod:`protocol.ceph.messages`)
are the ones every Pacific peer expects. Raw-segment messages are the application's
business.
"""

from __future__ import annotations

__all__ = ["CEPH_FEATURES", "CRUSH_TUNABLES", "CRUSH_TUNABLES2", "CRUSH_TUNABLES3",
           "CRUSH_TUNABLES5", "CRUSH_V4", "MON_CLIENT_REQUIRED", "MSG_ADDR2", "PACIFIC_ALL",
           "REQUIRED", "SUPPORTED", "describe"]

CRUSH_TUNABLES = 1 << 18
CRUSH_TUNABLES2 = 1 << 25
CRUSH_TUNABLES3 = 1 << 41
CRUSH_V4 = 1 << 48
CRUSH_TUNABLES5 = 1 << 58
MSG_ADDR2 = 1 << 59

#: name -> bit mask of the Ceph feature bits this implementation names and relies on
CEPH_FEATURES: dict[str, int] = {
    "CRUSH_TUNABLES": CRUSH_TUNABLES,
    "CRUSH_TUNABLES2": CRUSH_TUNABLES2,
    "CRUSH_TUNABLES3": CRUSH_TUNABLES3,
    "CRUSH_V4": CRUSH_V4,
    "CRUSH_TUNABLES5": CRUSH_TUNABLES5,
    "MSG_ADDR2": MSG_ADDR2,
}

PACIFIC_ALL = 0x3F01CFBDFFFDFFFF
#: what a Pacific mon requires of a client (its IDENT_MISSING_FEATURES answer)
MON_CLIENT_REQUIRED = (CRUSH_TUNABLES | CRUSH_TUNABLES2 | CRUSH_TUNABLES3 | CRUSH_V4
                       | CRUSH_TUNABLES5 | MSG_ADDR2)
assert MON_CLIENT_REQUIRED == 0x0C01020002040000

#: what we advertise in CLIENT_IDENT / SERVER_IDENT
SUPPORTED = PACIFIC_ALL
#: what we demand of a peer: without MSG_ADDR2 we could not read its addresses
REQUIRED = MSG_ADDR2


def describe(mask: int) -> str:
    """``"MSG_ADDR2|bit 3"``: the named bits of ``mask``, the rest by number."""
    parts = [name for name, bit in CEPH_FEATURES.items() if mask & bit]
    rest = mask & ~sum(CEPH_FEATURES.values())
    parts += [f"bit {i}" for i in range(64) if rest >> i & 1]
    return "|".join(parts) if parts else "none"
