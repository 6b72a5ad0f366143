"""Entity names (``client.admin``) and the auth payload a client sends to a mon.

AUTH_REQUEST to a mon carries, after the method and modes, a payload that starts with
u8 AUTH_MODE_MON (10), then the EntityName (le32 entity type, le32 length + id such as
``"admin"``) and le64 global_id (0 on a first connection). Method none adds nothing
more (``notes/msgr2-wire.md``). asyncmsgr's own servers accept and ignore it, so a client
sends it to every server: whether the peer is a mon is not known before the banner.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LocalProtocolError
from .encoding import Buffer, Decoder, Encoder

__all__ = ["AUTH_MODE_MON", "ENTITY_TYPES", "EntityName", "decode_mon_auth_payload",
           "mon_auth_payload"]

AUTH_MODE_MON = 10
#: CEPH_ENTITY_TYPE_* by the name used in "type.id"
ENTITY_TYPES = {"mon": 1, "mds": 2, "osd": 4, "client": 8, "mgr": 16}
_TYPE_NAMES = {v: k for k, v in ENTITY_TYPES.items()}


@dataclass(frozen=True, slots=True)
class EntityName:
    type: int
    id: str

    def __str__(self) -> str:
        return f"{_TYPE_NAMES.get(self.type, str(self.type))}.{self.id}"

    @classmethod
    def parse(cls, text: str) -> EntityName:
        kind, dot, ident = text.partition(".")
        if not dot or kind not in ENTITY_TYPES or not ident:
            raise LocalProtocolError(
                f"entity name {text!r} is not TYPE.ID with TYPE one of "
                f"{', '.join(ENTITY_TYPES)} (e.g. client.admin)", "bad_field")
        return cls(ENTITY_TYPES[kind], ident)


def mon_auth_payload(name: EntityName, global_id: int = 0) -> bytes:
    enc = Encoder("mon auth payload").u8(AUTH_MODE_MON, "mode")
    enc.u32(name.type, "entity_type").string(name.id, "entity_id")
    return enc.u64(global_id, "global_id").getvalue()


def decode_mon_auth_payload(payload: Buffer) -> tuple[EntityName, int]:
    """(name, global_id) of a mon auth payload; bytes after them (cephx) are left."""
    dec = Decoder(payload, "mon auth payload")
    mode = dec.u8("mode")
    if mode != AUTH_MODE_MON:
        dec.fail("mode", f"is {mode}, expected AUTH_MODE_MON ({AUTH_MODE_MON})")
    name = EntityName(dec.u32("entity_type"), dec.string("entity_id", 256))
    return name, dec.u64("global_id")
