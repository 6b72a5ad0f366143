"""SERVER_IDENT identity checks: strict (Ceph) and accept-and-record (port forwarding)."""

from __future__ import annotations

import dataclasses

import pytest

from protocol.connection import Connection, Ready, Role, State
from protocol.control import EntityAddr
from protocol.errors import RemoteProtocolError
from protocol.features import EntityType
from protocol.identity import IdentityCheck, default_identity_check, names_dialled

from .test_connection import Pair, pump

FORWARDED = EntityAddr(0, "127.0.0.1", 7815)   # the forwarder's port, not the server's


def _dial(pair: Pair, target: EntityAddr, check: IdentityCheck) -> Connection:
    pair.ccfg = dataclasses.replace(pair.ccfg, identity_check=check)
    pair.client = Connection(Role.CLIENT, pair.ccfg, pair.client_session, target_addr=target)
    pair.server = Connection(Role.SERVER, pair.scfg)
    return pair.client


def _finish(pair: Pair) -> list[object]:
    ev_c, ev_s = pump(pair.client, pair.server)
    for e in ev_s:
        pair.decide(e)
    more_c, _ = pump(pair.client, pair.server)
    return ev_c + more_c


def test_strict_refuses_a_server_naming_another_address_and_says_what_to_do() -> None:
    p = Pair()
    _dial(p, FORWARDED, IdentityCheck.STRICT)
    with pytest.raises(RemoteProtocolError) as info:
        _finish(p)
    err = info.value
    assert err.code == "bad_ident"
    assert "identifies as 127.0.0.1:6800, not 127.0.0.1:7815 that we dialled" in err.reason
    assert "--advertise" in err.reason and "record" in err.reason
    assert p.client.state is not State.READY


def test_record_accepts_and_names_the_dialled_address() -> None:
    p = Pair()
    _dial(p, FORWARDED, IdentityCheck.RECORD)
    events = _finish(p)
    ready = [e for e in events if isinstance(e, Ready)]
    assert len(ready) == 1 and ready[0].unnamed_target == FORWARDED
    assert [(a.host, a.port) for a in ready[0].peer_addrs] == [("127.0.0.1", 6800)]
    assert p.client.state is State.READY


def test_matching_address_passes_strict_without_a_record() -> None:
    p = Pair()
    _dial(p, EntityAddr(0, "127.0.0.1", 6800), IdentityCheck.STRICT)
    ready = [e for e in _finish(p) if isinstance(e, Ready)]
    assert len(ready) == 1 and ready[0].unnamed_target is None


@pytest.mark.parametrize("named, dialled, ok", [
    (("127.0.0.1", 6800), ("127.0.0.1", 6800), True),
    (("0.0.0.0", 6800), ("127.0.0.1", 6800), True),     # a wildcard bind names any host
    (("::", 6800), ("::1", 6800), True),
    (("127.0.0.1", 6800), ("127.0.0.2", 6800), False),  # another host, same port
    (("127.0.0.1", 6800), ("127.0.0.1", 6801), False),
    (("127.0.0.1", 6800), ("", 0), True),               # nothing dialled to compare
])
def test_names_dialled(named: tuple[str, int], dialled: tuple[str, int], ok: bool) -> None:
    assert names_dialled(EntityAddr(0, *dialled), [EntityAddr(5, *named)]) is ok


def test_defaults_strict_for_cluster_members_record_for_clients() -> None:
    assert default_identity_check(EntityType.CLIENT) is IdentityCheck.RECORD
    for t in (EntityType.MON, EntityType.OSD, EntityType.MGR, EntityType.MDS):
        assert default_identity_check(t) is IdentityCheck.STRICT
