"""asyncmsgr's Messenger against a real ceph-mon 16.2.15: the mon is the oracle.

Each test talks msgr2.1 (crc mode, auth none) to the module's mon through
:class:`pool.messenger.monclient.MonClient` (a Messenger with Ceph's lossy_client policy), or to a
mon of its own when it restarts it or needs other auth settings.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool.api import AuthSettings
from pool.api import AsyncConnection, ConnState
from pool.api import Dispatcher
from pool.api import Messenger
from pool.api import MonClient, MonError
from protocol.ceph import features as cf
from protocol.errors import LocalProtocolError
from protocol.features import ASYNCMSGR, EntityType
from protocol.message import Message
from protocol.policy import Policy
from tests.ceph.mon import CephMon, running_mon
from transport.event_center import EventCenter


def test_handshake_then_mping(ceph_mon: CephMon) -> None:
    with MonClient(ceph_mon.addr) as c:
        rtt, status = c.ping()
        conn = c.conn
        assert conn is not None and conn.state is ConnState.READY
        assert conn.peer_type == EntityType.MON
        # the mon announced itself in SERVER_IDENT with its v2 address
        assert [(a.host, a.port) for a in conn.peer_addrs] == [("127.0.0.1", ceph_mon.port)]
        assert conn.wire is not None and not conn.wire.peer_features & ASYNCMSGR
        assert 0 < rtt < 5
        assert status["health"]["status"] == "HEALTH_OK"
        assert status["mon_status"]["monmap"]["fsid"] == str(ceph_mon.fsid)


def test_get_version_osdmap(ceph_mon: CephMon) -> None:
    with MonClient(ceph_mon.addr) as c:
        reply = c.get_version("osdmap")
        assert reply.version >= 1 and 1 <= reply.oldest_version <= reply.version
        assert c.get_version("monmap").version >= 1


def test_mon_dump_command(ceph_mon: CephMon) -> None:
    with MonClient(ceph_mon.addr) as c:
        ack = c.command({"prefix": "mon dump", "format": "json"})
        assert ack.r == 0 and ack.rs.startswith("dumped monmap epoch")
        dump = json.loads(ack.outbl)
        assert uuid.UUID(dump["fsid"]) == ceph_mon.fsid
        assert [m["name"] for m in dump["mons"]] == ["a"]
        bad = c.command({"prefix": "no such command"})
        assert bad.r < 0 and bad.rs  # the mon explains, the session survives
        assert c.status()["fsid"] == str(ceph_mon.fsid)


def test_keepalive2_round_trip(ceph_mon: CephMon) -> None:
    with MonClient(ceph_mon.addr) as c:
        conn = c.connect()
        assert conn.last_keepalive_ack is None
        sent = c.center.now()
        conn.send_keepalive()  # stamped with the loop's clock
        c.wait_until(lambda: conn.last_keepalive_ack is not None, "KEEPALIVE2_ACK")
        sec, nsec = conn.last_keepalive_ack or (0, 0)
        # the mon echoed our stamp (utime_t: le32 sec, le32 nsec)
        assert 0 <= sec + nsec / 1e9 - sent < 5 and 0 <= nsec < 10**9


def test_asyncmsgr_message_to_the_mon_is_refused_before_sending(ceph_mon: CephMon) -> None:
    with MonClient(ceph_mon.addr) as c:
        conn = c.connect()
        with pytest.raises(LocalProtocolError, match="Ceph daemon") as info:
            conn.send_message(Message(1, {"not": "ceph"}))
        assert info.value.code == "ceph_peer"
        c.ping()  # nothing was sent: the mon did not close the session
        assert conn.state is ConnState.READY and c.reconnects == 0


def test_mon_restarted_under_a_connected_client(fresh_mon: CephMon) -> None:
    told: list[AsyncConnection] = []
    with MonClient(fresh_mon.addr, on_reset=told.append) as c:
        c.ping()
        first = c.conn
        fresh_mon.restart()
        # The lossy session faults when the mon goes away, and the application is told.
        c.wait_until(lambda: len(told) == 1, "ms_handle_reset after the mon restart")
        assert told == [first] and first is not None and first.state is ConnState.CLOSED
        _rtt, status = c.ping()  # a new session to the restarted mon
        assert c.reconnects == 1 and c.conn is not first
        assert status["mon_status"]["monmap"]["fsid"] == str(fresh_mon.fsid)


def test_too_few_features_get_ident_missing_features(ceph_mon: CephMon) -> None:
    with MonClient(ceph_mon.addr) as c:
        # advertise only Ceph feature bit 0: the mon answers IDENT_MISSING_FEATURES
        c.msgr.proto_config.ceph_features_supported = 1
        c.msgr.proto_config.ceph_features_required = 0
        with pytest.raises(MonError) as info:
            c.ping()
    text = str(info.value)
    missing = cf.MON_CLIENT_REQUIRED & ~1
    assert f"{missing:#x}" in text and "MSG_ADDR2" in text and "did not advertise" in text


class _Collect(Dispatcher):
    def __init__(self) -> None:
        self.resets = 0

    def ms_handle_reset(self, conn: AsyncConnection) -> None:
        self.resets += 1


def _fault_of(addr: tuple[str, int], auth: AuthSettings) -> str:
    center = EventCenter()
    msgr = Messenger(center, entity_type=EntityType.CLIENT, policy=Policy.lossy_client(),
                     auth=auth)
    d = _Collect()
    msgr.add_dispatcher(d)
    try:
        conn = msgr.connect(addr)
        deadline = time.monotonic() + 10
        while d.resets == 0:
            assert time.monotonic() < deadline, "the mon did not refuse us"
            center.process_events(0.05)
        return conn.last_error
    finally:
        msgr.shutdown()
        center.process_events(0)
        center.close()


def test_auth_bad_method_is_worded(ceph_mon: CephMon) -> None:
    # asyncmsgr's own shared-secret method is a number Ceph does not know
    reason = _fault_of(("127.0.0.1", ceph_mon.port),
                       AuthSettings(method="secret", keyring={"client.admin": b"k" * 16}))
    assert "rejected auth method asyncmsgr-secret (EOPNOTSUPP)" in reason
    assert "allows methods [none]" in reason


@pytest.fixture
def cephx_mon(tmp_path: Path) -> Iterator[CephMon]:
    with running_mon(tmp_path, auth="cephx") as mon:
        yield mon


def test_mon_requiring_cephx_is_reported_clearly(cephx_mon: CephMon) -> None:
    with MonClient(cephx_mon.addr) as c, pytest.raises(MonError) as info:
        c.ping()
    text = str(info.value)
    assert "allows methods [cephx]" in text and "asyncmsgr does not implement" in text
    assert "auth_client_required" in text


def test_asyncmsgr_message_queued_before_the_handshake_faults_cleanly(ceph_mon: CephMon) -> None:
    # Queued while the peer is not yet known; once the mon's banner shows it is a Ceph
    # daemon, the message is refused before anything is written and the session faults
    # with the reason (lossy: the application is told by ms_handle_reset).
    center = EventCenter()
    msgr = Messenger(center, entity_type=EntityType.CLIENT, policy=Policy.lossy_client())
    d = _Collect()
    msgr.add_dispatcher(d)
    try:
        conn = msgr.connect(("127.0.0.1", ceph_mon.port))
        conn.send_message(Message(1, {"not": "ceph"}))
        deadline = time.monotonic() + 10
        while d.resets == 0:
            assert time.monotonic() < deadline, "no reset after the refused message"
            center.process_events(0.05)
        assert "Ceph daemon" in conn.last_error and conn.last_error.startswith("cannot send")
        assert msgr.stats["local_error_ceph_peer"] == 1 and msgr.msgs_out == 0
    finally:
        msgr.shutdown()
        center.process_events(0)
        center.close()
