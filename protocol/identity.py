"""How a client judges the addresses a server names in SERVER_IDENT.

Ceph's client refuses a server whose SERVER_IDENT does not contain the address it dialled
(``ProtocolV2`` faults with "peer identifies as ..., does not include ..."): cluster
members know each other's addresses from the maps, so a mismatch means the wrong daemon.
A client of a *service* often dials an address the server cannot know: a port forward
(``docker -p``), a Kubernetes Service, HAProxy in TCP mode, an SSH tunnel. For those the
client records what the server calls itself and carries on (Kafka's
``advertised.listeners`` and Ceph's ``public_addr`` solve the same thing server-side:
``msgr serve --advertise``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from .control import EntityAddr

__all__ = ["IdentityCheck", "default_identity_check", "names_dialled", "mismatch_reason"]

#: hosts that mean "any address of this machine": a server bound there cannot name the
#: one the client used, so they match any dialled host
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


class IdentityCheck(enum.Enum):
    STRICT = "strict"   # refuse a server that does not name the dialled address (Ceph)
    RECORD = "record"   # accept it and record the addresses it names


def default_identity_check(entity_type: int) -> IdentityCheck:
    """Strict between cluster members (mon, osd, mgr, mds), as Ceph is; record for
    clients (entity type 8), which reach services through forwarders."""
    return IdentityCheck.RECORD if entity_type == 8 else IdentityCheck.STRICT


def names_dialled(target: EntityAddr, addrs: Iterable[EntityAddr]) -> bool:
    """True when one of the server's addresses is the one we dialled (nonces aside: the
    client cannot know the server's nonce before it answers)."""
    if not target.port:
        return True  # a path or an unbound target: nothing to compare
    for a in addrs:
        if a.port == target.port and (a.host == target.host or a.host in _WILDCARD_HOSTS
                                      or target.host in _WILDCARD_HOSTS):
            return True
    return False


def mismatch_reason(target: EntityAddr, addrs: Iterable[EntityAddr]) -> str:
    """Words for a strict refusal: what the server said, and the two ways out."""
    named = ", ".join(f"{a.host}:{a.port}" for a in addrs) or "no address"
    return (f"server identifies as {named}, not {target.host}:{target.port} that we dialled. "
            "If it is behind port forwarding (docker -p, a load balancer, an SSH tunnel), "
            "start it with `msgr serve --advertise HOST:PORT` naming the forwarded address, "
            "or connect with identity_check='record' (msgr stress --identity record)")
