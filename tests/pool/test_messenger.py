"""Ports of Ceph's test_msgr.cc over real loopback sockets, in one process.

Every messenger shares one EventCenter driven by the test thread; waits are bounded
loops over ``process_events`` with a deadline (no sleeping)."""

from __future__ import annotations

import collections
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pool.api import AsyncConnection, ConnState, Dispatcher, Messenger, MessengerConfig
from protocol.features import EntityType
from protocol.errors import LocalProtocolError
from protocol.message import Message
from protocol.policy import Backoff, Policy
from transport.event_center import EventCenter

FAST = Backoff(initial=0.02, maximum=0.5)  # Ceph's tests set ms_max_backoff=1


class Recorder(Dispatcher):
    """Counts what each connection saw; optionally echoes (the server side)."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received: collections.defaultdict[AsyncConnection, list[Any]] = \
            collections.defaultdict(list)
        self.connects = 0
        self.accepts = 0
        self.resets = 0
        self.remote_resets = 0

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        self.received[conn].append(msg.front)
        if self.echo:
            conn.send_message(Message(msg.type, msg.front, data=bytes(msg.data)))

    def ms_handle_connect(self, conn: AsyncConnection) -> None:
        self.connects += 1

    def ms_handle_accept(self, conn: AsyncConnection) -> None:
        self.accepts += 1

    def ms_handle_reset(self, conn: AsyncConnection) -> None:
        self.resets += 1

    def ms_handle_remote_reset(self, conn: AsyncConnection) -> None:
        self.remote_resets += 1

    def total(self) -> int:
        return sum(len(v) for v in self.received.values())


@pytest.fixture
def center() -> Iterator[EventCenter]:
    c = EventCenter()
    yield c
    c.close()


class Harness:
    def __init__(self, center: EventCenter, stack: str = "posix", tmp: str = "") -> None:
        self.center = center
        self.msgrs: list[Messenger] = []
        self.stack = stack
        self.tmp = tmp

    def messenger(self, entity: int, policy: Policy, dispatcher: Dispatcher,
                  bind: bool = False, **kw: Any) -> Messenger:
        if self.stack == "rdma":
            from transport.rdma import RdmaStack
            kw.setdefault("stack", RdmaStack("softverbs"))
        knobs = {k: kw.pop(k) for k in list(kw) if k in MessengerConfig.__dataclass_fields__}
        m = Messenger(self.center, MessengerConfig(**{"backoff": FAST, **knobs}),
                      entity_type=entity, policy=policy, **kw)
        m.add_dispatcher(dispatcher)
        if bind:
            if self.stack == "rdma":
                m.bind(os.path.join(self.tmp, f"rdma{len(self.msgrs)}.sock"))
            else:
                m.bind(("127.0.0.1", 0))
        self.msgrs.append(m)
        return m

    def wait_for(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = self.center.now() + timeout
        while not cond():
            if self.center.now() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            self.center.process_events(0.05)

    def close(self) -> None:
        for m in self.msgrs:
            m.shutdown()
        # Let closes settle (no callbacks pending on closed fds).
        self.center.process_events(0)


@pytest.fixture
def h(center: EventCenter) -> Iterator[Harness]:
    harness = Harness(center)
    yield harness
    harness.close()


def addr_of(m: Messenger) -> Any:
    bound = m.listeners[0].address
    if isinstance(bound, str):
        return bound
    return (str(bound[0]), int(bound[1]))


def test_simple_round_trip_and_mark_down(h: Harness) -> None:
    sd, cd = Recorder(echo=True), Recorder()
    srv = h.messenger(EntityType.OSD, Policy.stateless_server(), sd, bind=True)
    cli = h.messenger(EntityType.CLIENT, Policy.lossy_client(), cd)
    conn = cli.connect(addr_of(srv))
    conn.send_message(Message(1, "ping"))
    h.wait_for(lambda: cd.total() == 1)
    assert cd.received[conn] == ["ping"] and cd.connects == 1 and sd.accepts == 1
    assert conn.is_connected()
    conn.mark_down()
    assert not conn.is_connected()
    # A fresh session works after mark_down.
    conn2 = cli.connect(addr_of(srv))
    assert conn2 is not conn
    conn2.send_message(Message(1, "again"))
    h.wait_for(lambda: cd.received[conn2] == ["again"])


def test_reconnect_delivers_pending_message(h: Harness) -> None:
    """ReconnectTest: a fault after the server read a message; the reply survives."""
    sd, cd = Recorder(echo=True), Recorder()
    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), sd, bind=True)
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_peer(), cd)
    conn = cli.connect(addr_of(srv))
    conn.send_message(Message(1, 0))
    h.wait_for(lambda: cd.total() == 1)
    for i in range(1, 50):
        conn.send_message(Message(1, i))
    conn.fault_for_test()
    h.wait_for(lambda: cd.total() == 50)
    assert cd.received[conn] == list(range(50))
    assert srv.stats["sessions_resumed"] >= 1
    assert cd.remote_resets == 0


def test_stateful_server_detects_client_restart(h: Harness) -> None:
    """StatefulTest: a new client session (new cookie) → server ms_handle_remote_reset."""
    sd, cd = Recorder(echo=True), Recorder()
    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), sd, bind=True)
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), cd)
    conn = cli.connect(addr_of(srv))
    conn.send_message(Message(1, "a"))
    h.wait_for(lambda: cd.total() == 1)
    conn.mark_down()
    conn2 = cli.connect(addr_of(srv))
    conn2.send_message(Message(1, "b"))
    h.wait_for(lambda: cd.received[conn2] == ["b"])
    assert sd.remote_resets == 1
    # The server kept one session for this client, not two.
    assert len(srv.connections()) == 1


def test_server_mark_down_gives_lossless_client_remote_reset(h: Harness) -> None:
    """StatefulTest (second half) / ClientStandbyTest: the server forgets the session; the
    client's next send reconnects, hears remote_reset, and delivery continues."""
    sd, cd = Recorder(echo=True), Recorder()
    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), sd, bind=True)
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_peer(), cd)
    conn = cli.connect(addr_of(srv))
    conn.send_message(Message(1, 1))
    h.wait_for(lambda: cd.total() == 1)
    for c in srv.connections():
        c.mark_down()
    h.wait_for(lambda: conn.state in (ConnState.STANDBY, ConnState.BACKOFF,
                                      ConnState.CONNECTING, ConnState.HANDSHAKE))
    conn.send_message(Message(1, 2))
    # The server has no session: SESSION_RESET(full) discards what was queued (Ceph's
    # reset_session) and the dispatcher is told — forgiveness only with a notification.
    h.wait_for(lambda: cd.remote_resets == 1 and conn.is_connected())
    conn.send_message(Message(1, 3))
    h.wait_for(lambda: cd.total() == 2)
    assert cd.received[conn] == [1, 3]


def test_stateless_server_lossy_client(h: Harness) -> None:
    """StatelessTest: the server keeps nothing; after its mark_down the lossy client is
    reset (keepalive detects it) and a fresh connect works."""
    sd, cd = Recorder(echo=True), Recorder()
    srv = h.messenger(EntityType.OSD, Policy.stateless_server(), sd, bind=True)
    cli = h.messenger(EntityType.CLIENT, Policy.lossy_client(), cd)
    conn = cli.connect(addr_of(srv))
    conn.send_message(Message(1, "x"))
    h.wait_for(lambda: cd.total() == 1)
    for c in srv.connections():
        c.mark_down()
    conn.send_keepalive()
    h.wait_for(lambda: not conn.is_connected())
    assert cd.resets == 1
    conn2 = cli.connect(addr_of(srv))
    conn2.send_message(Message(1, "y"))
    h.wait_for(lambda: cd.received[conn2] == ["y"])


def test_idle_timeout_closes_lossy_connection(h: Harness) -> None:
    """TimeoutTest: ms_connection_idle_timeout=1 → not connected after idling."""
    sd, cd = Recorder(echo=True), Recorder()
    srv = h.messenger(EntityType.OSD, Policy.stateless_server(), sd, bind=True)
    cli = h.messenger(EntityType.CLIENT, Policy.lossy_client(), cd, idle_timeout=0.5)
    conn = cli.connect(addr_of(srv))
    conn.send_message(Message(1, "x"))
    h.wait_for(lambda: cd.total() == 1)
    h.wait_for(lambda: not conn.is_connected(), timeout=5)
    assert cli.stats["idle_timeouts"] == 1


def test_connection_race_converges(h: Harness) -> None:
    """ConnectionRaceTest: two lossless peers connect to each other at once; both end up
    with exactly one session and every message arrives once."""
    da, db = Recorder(), Recorder()
    a = h.messenger(EntityType.OSD, Policy.lossless_peer_reuse(), da, bind=True)
    b = h.messenger(EntityType.OSD, Policy.lossless_peer_reuse(), db, bind=True)
    ab = a.connect(addr_of(b))
    ba = b.connect(addr_of(a))
    ab.send_message(Message(1, "from a"))
    ba.send_message(Message(1, "from b"))
    h.wait_for(lambda: da.total() == 1 and db.total() == 1)
    assert [f for v in db.received.values() for f in v] == ["from a"]
    assert [f for v in da.received.values() for f in v] == ["from b"]
    assert len(a.connections()) == 1 and len(b.connections()) == 1


def test_priority_order_on_the_wire(h: Harness) -> None:
    sd, cd = Recorder(), Recorder()
    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), sd, bind=True)
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), cd)
    conn = cli.connect(addr_of(srv))
    # Queued before the handshake completes: sent in priority order once READY.
    for i, prio in enumerate([10, 200, 10, 200]):
        conn.send_message(Message(1, i, priority=prio))
    h.wait_for(lambda: sd.total() == 4)
    assert [f for v in sd.received.values() for f in v] == [1, 3, 0, 2]


def test_receive_throttle_stops_reading_and_resumes(h: Harness) -> None:
    """A dispatcher that holds messages: the server stops reading at the throttle limit
    (memory stays bounded) and resumes when they are released."""
    held: list[Callable[[], None]] = []

    class Holder(Dispatcher):
        def __init__(self) -> None:
            self.seen = 0

        def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
            self.seen += 1
            held.append(srv.hold(msg))

    holder = Holder()
    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), holder, bind=True,
                      throttle_messages=10)
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), Recorder())
    conn = cli.connect(addr_of(srv))
    for i in range(100):
        conn.send_message(Message(1, i, data=b"z" * 1000))
    h.wait_for(lambda: holder.seen == 10)
    for _ in range(20):
        h.center.process_events(0.01)
    assert holder.seen == 10  # throttled: no more delivered while held
    assert srv.throttle_msgs.current == 10
    while holder.seen < 100:
        for release in held:
            release()
        held.clear()
        h.wait_for(lambda: holder.seen >= 100 or len(held) > 0)
    for release in held:
        release()
    assert srv.throttle_msgs.current == 0


def test_dispatcher_exception_does_not_kill_connection(h: Harness) -> None:
    class Bad(Recorder):
        def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
            super().ms_dispatch(conn, msg)
            if msg.front == "boom":
                raise RuntimeError("application bug")

    sd, cd = Bad(echo=True), Recorder()
    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), sd, bind=True)
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), cd)
    conn = cli.connect(addr_of(srv))
    conn.send_message(Message(1, "boom"))
    conn.send_message(Message(1, "ok"))
    h.wait_for(lambda: cd.total() == 2)
    assert srv.stats["dispatch_errors"] == 1


def test_unencodable_message_is_refused_at_send(h: Harness) -> None:
    """The sender hears of a message that cannot be encoded; the session goes on intact
    (no sequence number was taken, so the peer sees no gap)."""
    sd, cd = Recorder(echo=True), Recorder()
    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), sd, bind=True)
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), cd)
    conn = cli.connect(addr_of(srv))
    conn.send_message(Message(1, "first"))
    with pytest.raises(LocalProtocolError) as info:
        conn.send_message(Message(1, object()))
    assert info.value.code == "bad_front"
    with pytest.raises(LocalProtocolError) as info:
        conn.send_message(Message(70_000, "type is a u16"))
    assert info.value.code == "bad_header"
    conn.send_message(Message(1, "second"))
    h.wait_for(lambda: cd.total() == 2)
    assert cd.received[conn] == ["first", "second"]
    assert conn.session is not None and conn.session.out_seq == 2


def test_garbage_faults_only_that_connection(h: Harness) -> None:
    """Invariant 4 in one process: random bytes to the port fault that connection only."""
    import socket

    sd, cd = Recorder(echo=True), Recorder()
    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), sd, bind=True)
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), cd)
    conn = cli.connect(addr_of(srv))
    conn.send_message(Message(1, 0))
    h.wait_for(lambda: cd.total() == 1)
    rng = random.Random(4)
    for i in range(30):
        s = socket.create_connection(addr_of(srv))
        payload = rng.randbytes(rng.randint(1, 300))
        if i % 3 == 0:
            payload = b"ceph v2\n" + payload
        s.sendall(payload)
        s.close()
        conn.send_message(Message(1, i + 1))
    h.wait_for(lambda: cd.total() == 31)
    assert cd.received[conn] == list(range(31))


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["posix", "rdma"])
def test_synthetic_workload_with_injected_failures(center: EventCenter, stack: str,
                                                   tmp_path: Any) -> None:
    """SyntheticInjectTest: several servers and clients, lossless policies, socket failures
    at 1/30 on both sides, random payloads 32 B..256 KiB, at most 64 in flight. Replies come
    back in per-connection send order, byte-identical, none lost, none duplicated.
    ``rdma`` runs over the softverbs provider: EMULATION, not RDMA hardware."""
    h = Harness(center, stack, str(tmp_path))
    try:
        _synthetic(h)
    finally:
        h.close()


def _synthetic(h: Harness) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    buffers = [rng.randbytes(rng.randint(32, 256 * 1024)) for _ in range(24)]
    n_servers, n_clients, total, max_in_flight = 3, 6, 1500, 64
    servers = [h.messenger(EntityType.OSD, Policy.stateful_server(), Recorder(echo=True),
                           bind=True, inject_socket_failures=30, seed=i)
               for i in range(n_servers)]

    class Checker(Dispatcher):
        def __init__(self) -> None:
            self.pending: dict[AsyncConnection, collections.deque[tuple[int, bytes]]] = \
                collections.defaultdict(collections.deque)
            self.done = 0
            self.resets = 0

        def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
            q = self.pending[conn]
            assert q, f"unexpected reply {msg.front} (duplicate?)"
            seq, data = q.popleft()
            assert msg.front == seq, f"reordered: expected {seq}, got {msg.front}"
            assert bytes(msg.data) == data, f"corrupted payload for {seq}"
            self.done += 1

        def ms_handle_remote_reset(self, conn: AsyncConnection) -> None:
            self.resets += 1  # forgiveness only on a reset notification
            self.pending[conn].clear()

    checker = Checker()
    clients = [h.messenger(EntityType.CLIENT, Policy.lossless_client(), checker,
                           inject_socket_failures=30, seed=100 + i) for i in range(n_clients)]
    conns = [c.connect(addr_of(s)) for c in clients for s in servers]
    sent = 0
    deadline = h.center.now() + 90
    while checker.done + sum(0 for _ in ()) < total:
        in_flight = sum(len(q) for q in checker.pending.values())
        while sent < total and in_flight < max_in_flight:
            conn = rng.choice(conns)
            data = rng.choice(buffers)
            checker.pending[conn].append((sent, data))
            conn.send_message(Message(7, sent, data=data))
            sent += 1
            in_flight += 1
        if sent == total and in_flight == 0:
            break
        assert h.center.now() < deadline, f"stuck: {checker.done}/{total} done"
        h.center.process_events(0.05)
    assert checker.resets == 0, "a lossless session was reset"
    assert checker.done == total
    faults = sum(m.stats["faults"] for m in h.msgrs)
    injected = sum(m.stats["injected_failures"] for m in h.msgrs)
    assert injected > 20 and faults > 20, (injected, faults)
    print(f"synthetic[{h.stack}]: {total} msgs, {injected} injected failures, {faults} faults")


def test_payload_reaches_dispatcher_without_a_copy(h: Harness) -> None:
    """4 KiB payloads: the kernel copies into the receive buffer once; the dispatcher gets
    a memoryview of that very buffer (no bytes() of the segment, no re-encoding)."""
    seen: list[memoryview] = []

    class Keep(Dispatcher):
        def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
            seen.append(msg.data)  # type: ignore[arg-type]

    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), Keep(), bind=True)
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), Recorder())
    conn = cli.connect(addr_of(srv))
    payloads = [os.urandom(4096) for _ in range(50)]
    for p in payloads:
        conn.send_message(Message(1, None, data=p))
    h.wait_for(lambda: len(seen) == 50)
    server_conn = srv.connections()[0]
    assert server_conn.wire is not None
    for view, p in zip(seen, payloads):
        assert isinstance(view, memoryview) and bytes(view) == p
        # The view's owner is a receive buffer the socket filled via recv_into.
        assert isinstance(view.obj, bytearray) and len(view.obj) > len(p)
    # Many payloads share a few receive chunks: there is no per-message buffer at all.
    owners = {id(v.obj) for v in seen}
    assert len(owners) <= 5, f"{len(owners)} buffers for {len(seen)} payloads"


def test_replies_to_a_large_batch_leave_before_the_batch_is_done(h: Harness) -> None:
    """A window of requests that arrives in one read is answered in slices of
    ``_FLUSH_EVERY``: the first replies are on the wire while later requests are still
    being dispatched, so the peer works in parallel (without this, a full window
    crossed as one batch each way and the two sides took turns)."""
    from pool.messenger import connection as connection_mod

    sent_at_dispatch: list[int] = []

    class Echo(Dispatcher):
        def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
            sent_at_dispatch.append(conn.msgr.bytes_out)
            conn.send_message(Message(1, msg.front))

    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), Echo(), bind=True)
    cd = Recorder()
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), cd)
    conn = cli.connect(addr_of(srv))
    conn.send_message(Message(1, -1))
    h.wait_for(lambda: cd.total() == 1)
    # 128 requests queued before the loop runs: one write, one read on the server.
    n = 128
    assert connection_mod._FLUSH_EVERY < n
    for i in range(n):
        conn.send_message(Message(1, i))
    sent_at_dispatch.clear()
    h.wait_for(lambda: cd.total() == 1 + n)
    assert cd.received[conn] == [-1, *range(n)]
    start = sent_at_dispatch[0]
    # Before the last request of the batch is dispatched, replies have been sent.
    assert sent_at_dispatch[-1] > start
    assert len(set(sent_at_dispatch)) >= 2


class FailureRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.failures: list[Any] = []

    def ms_handle_error(self, conn: AsyncConnection, failure: Any) -> None:
        self.failures.append(failure)


def test_unretryable_handshake_failure_reaches_the_app_and_loses_nothing(h: Harness) -> None:
    """A server naming another address (strict check): the app is told why, the session
    retries only at the backoff maximum, and its message arrives once the server is fixed."""
    sd, cd = Recorder(echo=True), FailureRecorder()
    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), sd, bind=True)
    host, port = addr_of(srv)
    srv.set_address((host, port + 1))  # advertises an address the client did not dial
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), cd, identity_check="strict")
    conn = cli.connect((host, port))
    conn.send_message(Message(1, "kept"))
    h.wait_for(lambda: bool(cd.failures))
    f = cd.failures[0]
    assert f.code == "bad_ident" and f.retry_in == FAST.maximum
    assert f"not {host}:{port} that we dialled" in f.reason and "--advertise" in f.reason
    assert conn.last_error is not None and "identifies as" in conn.last_error
    assert conn.state is ConnState.BACKOFF and conn.backoff == FAST.maximum
    assert cli.stats["handshake_failures_bad_ident"] >= 1
    srv.set_address((host, port))  # the operator fixes --advertise
    h.wait_for(lambda: cd.received[conn] == ["kept"])
    assert cd.connects == 1 and cd.remote_resets == 0


def test_record_identity_accepts_a_server_naming_another_address(h: Harness) -> None:
    sd, cd = Recorder(echo=True), FailureRecorder()
    srv = h.messenger(EntityType.OSD, Policy.stateful_server(), sd, bind=True)
    host, port = addr_of(srv)
    srv.set_address((host, port + 1))
    cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), cd)  # clients: record
    conn = cli.connect((host, port))
    conn.send_message(Message(1, "hi"))
    h.wait_for(lambda: cd.received[conn] == ["hi"])
    assert not cd.failures and cli.stats["ident_recorded"] == 1
    assert [(a.host, a.port) for a in conn.peer_addrs] == [(host, port + 1)]
