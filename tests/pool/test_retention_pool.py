"""Invariant 6 on a live pool: sessions of clients that vanish are bounded per worker
(count, bytes per session, bytes in total), the idle longest go first, and a client whose
session was forgotten is told when it comes back (SESSION_RESET ->
ms_handle_remote_reset), never silently.

Clients here are real: :mod:`tests.pool.raw_session` drives the protocol's own client
state machine over a plain socket (thousands of sessions in seconds), and a client
Messenger proves the dispatcher callback end to end."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from pool.api import AsyncConnection, Dispatcher, Messenger, MessengerConfig
from protocol.connection import Ready, ResetReceived
from protocol.features import EntityType
from protocol.message import Message
from protocol.policy import Backoff, Policy
from protocol.retention import RetentionCaps
from tests.pool.raw_session import RawClient, SessionRecord, abandon_session
from tests.pool.support import msgr, rss, running_pool, wait_for
from transport.event_center import EventCenter

ABANDONED = 2000
#: messages per abandoned session, each 16 B - 3 KiB (the sizes of the issue's report)
PER_SESSION = 8
#: cap used by the 2,000-session test, well below the default so eviction is exercised
CAP = 256
#: A worker may grow by at most this much RSS while 2,000 clients abandon sessions.
#: Before the retention caps and the payload copy it grew by ~260 MiB (each retained
#: echo reply pinned a 256 KiB receive buffer); the caps alone would still allow
#: 256 sessions x 256 KiB = 64 MiB. Measured with both: ~4 MiB.
RSS_GROWTH_BOUND = 24 << 20


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _payloads(rng: random.Random, n: int = PER_SESSION) -> list[bytes]:
    return [rng.randbytes(rng.randint(16, 3072)) for _ in range(n)]


def _perf_cli(admin: str) -> dict[str, Any]:
    """``msgr perf`` as a user runs it."""
    r = msgr("perf", "--admin", admin)
    assert r.returncode == 0, r.stderr
    perf: dict[str, Any] = json.loads(r.stdout)
    return perf


def _resume(port: int, rec: SessionRecord) -> object:
    """Come back as the client of ``rec``: SESSION_RECONNECT with its cookies."""
    rec.session.connect_seq += 1
    c = RawClient(port, nonce=rec.nonce, session=rec.session)
    try:
        return c.handshake()
    finally:
        c.close()


def test_two_thousand_abandoned_sessions_keep_worker_memory_bounded(tmp_path: Path) -> None:
    with running_pool(tmp_path, 2, app="echo",
                      extra=("--max-standby-sessions", str(CAP))) as pool:
        pids = pool.worker_pids()
        rss_before = {p: rss(p) for p in pids}
        fds_before = {p: _fds(p) for p in pids}
        rng = random.Random(13)
        records = [abandon_session(pool.port, _payloads(rng)) for _ in range(ABANDONED)]

        def settled() -> dict[str, Any] | None:
            perf: dict[str, Any] = pool.client.call("perf")
            t = perf["totals"]
            # Every session either is retained or was evicted (the last EOFs arrive).
            return perf if t["sessions_retained"] + t["sessions_evicted"] == ABANDONED \
                else None

        wait_for(settled, 30, "every abandoned session retained or evicted")
        perf = _perf_cli(pool.admin)
        for w in perf["workers"]:
            assert w["sessions_retained"] <= CAP, w
            assert w["retained_bytes"] <= w["sessions_retained"] * PER_SESSION * (3072 + 256), w
        assert perf["totals"]["sessions_evicted"] >= ABANDONED - 2 * CAP, perf["totals"]
        grown = {p: rss(p) - rss_before[p] for p in pids}
        assert all(g <= RSS_GROWTH_BOUND for g in grown.values()), \
            f"worker RSS grew by {grown} bytes, over the bound of {RSS_GROWTH_BOUND}"
        # A retained session has no socket: fds stay where they were.
        assert all(_fds(p) <= fds_before[p] + 2 for p in pids), (fds_before,
                                                                 {p: _fds(p) for p in pids})
        # The newest sessions are kept (oldest idle go first) and resume; the oldest
        # were forgotten and are told so.
        assert isinstance(_resume(pool.port, records[-1]), Ready)
        assert isinstance(_resume(pool.port, records[0]), ResetReceived)
        assert pool.status()["workers"][0]["restarts"] == 0


def test_session_over_byte_caps_is_evicted_and_told(tmp_path: Path) -> None:
    with running_pool(tmp_path, 1, app="echo",
                      extra=("--max-standby-session-bytes", "8192",
                             "--max-standby-bytes", "32768")) as pool:
        rng = random.Random(5)
        fat = abandon_session(pool.port, [rng.randbytes(4000) for _ in range(3)])
        wait_for(lambda: pool.client.call("perf")["totals"]["sessions_evicted"] == 1, 10,
                 "the session over the per-session cap evicted at once")
        assert pool.client.call("perf")["totals"]["sessions_retained"] == 0
        thin = [abandon_session(pool.port, [rng.randbytes(3000)]) for _ in range(20)]

        def all_in() -> dict[str, Any] | None:
            t: dict[str, Any] = pool.client.call("perf")["totals"]
            return t if t["sessions_retained"] + t["sessions_evicted"] == 21 else None

        t = wait_for(all_in, 10, "21 sessions accounted")
        assert 0 < t["retained_bytes"] <= 32768 and t["sessions_evicted"] > 1, t
        assert isinstance(_resume(pool.port, fat), ResetReceived)
        assert isinstance(_resume(pool.port, thin[0]), ResetReceived)
        assert isinstance(_resume(pool.port, thin[-1]), Ready)


class _Client(Dispatcher):
    def __init__(self) -> None:
        self.replies: list[Any] = []
        self.remote_resets = 0

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        self.replies.append(msg.front)

    def ms_handle_remote_reset(self, conn: AsyncConnection) -> None:
        self.remote_resets += 1


def test_evicted_client_gets_remote_reset(tmp_path: Path) -> None:
    center = EventCenter()
    client = _Client()
    m = Messenger(center, MessengerConfig(backoff=Backoff(0.02, 0.5)),
                  entity_type=EntityType.CLIENT, policy=Policy.lossless_client())
    m.add_dispatcher(client)

    def pump(cond: Any, what: str, timeout: float = 10.0) -> None:
        deadline = center.now() + timeout
        while not cond():
            assert center.now() < deadline, f"timed out waiting for {what}"
            center.process_events(0.02)

    try:
        with running_pool(tmp_path, 1, app="echo",
                          extra=("--max-standby-sessions", "4")) as pool:
            conn = m.connect(("127.0.0.1", pool.port))
            conn.send_message(Message(7, {"n": 1}))
            pump(lambda: client.replies == [{"n": 1}], "the first echo")
            # The client vanishes: its socket dies and its loop stands still meanwhile.
            conn.fault_for_test()
            wait_for(lambda: pool.client.call("perf")["totals"]["sessions_retained"] == 1,
                     10, "the server keeping the client's session")
            rng = random.Random(3)
            for _ in range(5):  # five newer absent sessions push it out (cap 4)
                abandon_session(pool.port, _payloads(rng, 2))
            wait_for(lambda: pool.client.call("perf")["totals"]["sessions_evicted"] >= 1,
                     10, "an eviction")
            # The client comes back: SESSION_RECONNECT -> SESSION_RESET -> a new session.
            pump(lambda: client.remote_resets == 1 and conn.is_connected(), "the remote reset")
            conn.send_message(Message(7, {"n": 2}))
            pump(lambda: client.replies == [{"n": 1}, {"n": 2}], "an echo on the new session")
            assert client.remote_resets == 1
            m.shutdown()
            center.process_events(0)
    finally:
        m.shutdown()
        center.close()


def test_migrated_standby_sessions_count_on_their_new_worker(tmp_path: Path) -> None:
    with running_pool(tmp_path, 2, app="echo") as pool:
        rng = random.Random(8)
        recs = [abandon_session(pool.port, _payloads(rng, 3)) for _ in range(12)]
        wait_for(lambda: pool.client.call("perf")["totals"]["sessions_retained"] == 12, 10,
                 "12 retained sessions")
        r = msgr("scale", "1", "--admin", pool.admin)
        assert r.returncode == 0, r.stderr
        pool.wait_accepting(1)

        def moved() -> list[dict[str, Any]] | None:
            ws = [w for w in pool.client.call("perf")["workers"] if w["state"] == "ACCEPTING"]
            return ws if len(ws) == 1 and ws[0]["sessions_retained"] == 12 else None

        ws = wait_for(moved, 20, "all 12 sessions retained by the surviving worker")
        assert ws[0]["retained_bytes"] > 12 * 3 * 16 and ws[0]["sessions_evicted"] == 0
        for rec in recs[:3]:  # the migrated sessions resume on their new owner
            assert isinstance(_resume(pool.port, rec), Ready)


class _Server(Dispatcher):
    """Echo, and remember the connection (to send to it while its client is away)."""

    def __init__(self) -> None:
        self.conns: list[AsyncConnection] = []
        self.resets = 0

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        self.conns.append(conn)
        conn.send_message(Message(msg.type, msg.front, data=msg.data))

    def ms_handle_reset(self, conn: AsyncConnection) -> None:
        self.resets += 1


def test_replies_queued_for_an_absent_client_count_against_its_cap() -> None:
    """In one process, two loops: the client's stands still while it is away. What the
    server queues for the absent client is counted; past the per-session cap the
    session is forgotten (server: ms_handle_reset) and the client, back, is told."""
    server_center, client_center = EventCenter(), EventCenter()
    server_d, client_d = _Server(), _Client()
    caps = RetentionCaps(max_sessions=8, max_session_bytes=64 * 1024, max_total_bytes=0)
    server = Messenger(server_center, MessengerConfig(retention=caps),
                       entity_type=EntityType.OSD, policy=Policy.stateful_server())
    server.add_dispatcher(server_d)
    port = server.bind(("127.0.0.1", 0))
    client = Messenger(client_center, MessengerConfig(backoff=Backoff(0.02, 0.5)),
                       entity_type=EntityType.CLIENT, policy=Policy.lossless_client())
    client.add_dispatcher(client_d)

    def pump(cond: Any, what: str, centers: tuple[EventCenter, ...]) -> None:
        deadline = server_center.now() + 10
        while not cond():
            assert server_center.now() < deadline, f"timed out waiting for {what}"
            for c in centers:
                c.process_events(0.01)

    both = (server_center, client_center)
    try:
        conn = client.connect(port)
        conn.send_message(Message(7, {"n": 1}, data=b"a" * 1000))
        pump(lambda: len(client_d.replies) == 1, "the first echo", both)
        conn.fault_for_test()
        pump(lambda: len(server.retained) == 1, "the server retaining the session",
             (server_center,))
        sconn = server_d.conns[0]
        retained = server.counters()["retained_bytes"]
        for _ in range(10):  # 10 x 4 KiB queued for the absent client: still under 64 KiB
            sconn.send_message(Message(8, None, data=b"b" * 4096))
        assert server.counters()["retained_bytes"] >= retained + 10 * 4096
        assert server.counters()["sessions_evicted"] == 0
        for _ in range(14):  # ... and past it: forgotten at once, the server's app is told
            sconn.send_message(Message(8, None, data=b"b" * 4096))
        assert server.counters()["sessions_evicted"] == 1 and len(server.retained) == 0
        assert server.counters()["retained_bytes"] == 0 and server_d.resets == 1
        pump(lambda: client_d.remote_resets == 1 and conn.is_connected(), "the remote reset",
             both)
    finally:
        client.shutdown()
        server.shutdown()
        for c in both:
            c.process_events(0)
            c.close()
