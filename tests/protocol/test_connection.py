"""Handshake and session state machines driven in pairs, without I/O (h11's ConnectionPair)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples

from protocol.connection import (
    NEED_DATA, TRANSITIONS, Config, Connection, IdentRequest, MessageReceived, Ready,
    ReconnectRequest, ResetReceived, Role, State, WaitReceived,
)
from protocol.control import EntityAddr, Hello, encode_control
from protocol.errors import RemoteProtocolError
from protocol.features import EntityType
from protocol.frames import frame_bytes, Tag
from protocol.message import PRIO_HIGH, PRIO_LOW, Message
from protocol.policy import Policy
from protocol.session import (
    Session, SessionView, Verdict, decide_ident, decide_reconnect,
)

SERVER_ADDR = EntityAddr(7, "127.0.0.1", 6800)
CLIENT_ADDR = EntityAddr(9, "", 0)


def _cookies() -> Iterator[int]:
    return itertools.count(1000)


def make_config(entity: int, addr: EntityAddr) -> Config:
    counter = _cookies()
    return Config(entity_type=entity, my_addr=addr, new_cookie=lambda: next(counter))


def pump(a: Connection, b: Connection) -> tuple[list[Any], list[Any]]:
    """Move bytes both ways until quiet; return the events each side produced."""
    ev_a: list[Any] = []
    ev_b: list[Any] = []
    for _ in range(50):
        moved = False
        for src, dst, evs in ((a, b, ev_b), (b, a, ev_a)):
            data = b"".join(bytes(x) for x in src.data_to_send())
            if data:
                moved = True
                dst.receive_data(data)
            while (ev := dst.next_event()) is not NEED_DATA:
                evs.append(ev)
        a.write_messages()
        b.write_messages()
        if not moved and not a.has_data_to_send() and not b.has_data_to_send():
            return ev_a, ev_b
    raise AssertionError("pump did not settle")


class Pair:
    """A client and a server connection with a tiny server-side registry."""

    def __init__(self, client_policy: Policy | None = None,
                 server_policy: Policy | None = None) -> None:
        self.client_session = Session(client_policy or Policy.lossless_client())
        self.server_policy = server_policy or Policy.stateful_server()
        self.server_sessions: dict[int, Session] = {}
        self.ccfg = make_config(EntityType.CLIENT, CLIENT_ADDR)
        self.scfg = make_config(EntityType.OSD, SERVER_ADDR)
        self.cookies = itertools.count(500)
        self.client: Connection
        self.server: Connection

    def connect(self) -> tuple[list[Any], list[Any]]:
        self.client = Connection(Role.CLIENT, self.ccfg, self.client_session,
                                 target_addr=EntityAddr(0, "127.0.0.1", 6800))
        self.server = Connection(Role.SERVER, self.scfg)
        ev_c, ev_s = pump(self.client, self.server)
        # Run the server's decisions until both sides settle.
        for _ in range(5):
            pending = [e for e in ev_s if isinstance(e, (IdentRequest, ReconnectRequest))]
            if not pending:
                break
            ev_s = [e for e in ev_s if e not in pending]
            for e in pending:
                self.decide(e)
            more_c, more_s = pump(self.client, self.server)
            ev_c += more_c
            ev_s += more_s
        return ev_c, ev_s

    def decide(self, ev: Any) -> None:
        if isinstance(ev, IdentRequest):
            s = Session(self.server_policy)
            self.server.accept_new_session(s, next(self.cookies))
            self.server_sessions[ev.ident.client_cookie] = s
        else:
            s = self.server_sessions.get(ev.request.client_cookie)
            if s is None:
                self.server.reject("reset", full=True)
            else:
                self.server.accept_reconnect(s)


def test_fresh_handshake_reaches_ready_both_sides() -> None:
    p = Pair()
    ev_c, ev_s = p.connect()
    assert [type(e) for e in ev_c] == [Ready]
    assert ev_c[0].resumed is False
    assert p.client.state is State.READY and p.server.state is State.READY
    assert p.client_session.server_cookie == 500
    assert p.client_session.client_cookie == 1000


def test_messages_flow_in_priority_order_and_are_acked() -> None:
    p = Pair()
    p.connect()
    for i, prio in enumerate([PRIO_LOW, PRIO_HIGH, PRIO_LOW, PRIO_HIGH]):
        p.client_session.queue(Message(1, {"i": i}, priority=prio))
    _, ev_s = pump(p.client, p.server)
    got = [e.message.front["i"] for e in ev_s if isinstance(e, MessageReceived)]
    assert got == [1, 3, 0, 2]  # highest priority first, FIFO within a priority
    assert [e.message.seq for e in ev_s] == [1, 2, 3, 4]
    # The server owed an ack and sent a standalone ACK frame: nothing left unacked.
    assert len(p.client_session.sent) == 0


def test_reconnect_replays_unacked_and_drops_duplicates() -> None:
    p = Pair()
    p.connect()
    for i in range(5):
        p.client_session.queue(Message(1, i, data=bytes([i]) * 10))
    # Deliver the frames to the server but lose its acks (socket dies after the write).
    p.client.write_messages()
    data = b"".join(bytes(x) for x in p.client.data_to_send())
    p.server.receive_data(data)
    got = []
    while (ev := p.server.next_event()) is not NEED_DATA:
        got.append(ev.message.front)
    assert got == [0, 1, 2, 3, 4]
    assert len(p.client_session.sent) == 5
    # Fault: the client requeues and reconnects on a new socket.
    p.client_session.requeue_sent()
    p.client_session.connect_seq += 1
    server_session = next(iter(p.server_sessions.values()))
    ev_c, ev_s = p.connect()
    assert any(isinstance(e, Ready) and e.resumed for e in ev_c)
    # Nothing is delivered twice: the server told us msg_seq=5, so nothing is replayed.
    assert not [e for e in ev_s if isinstance(e, MessageReceived)]
    assert server_session.duplicates_dropped == 0
    p.client_session.queue(Message(1, 5))
    _, ev_s = pump(p.client, p.server)
    assert [e.message.front for e in ev_s] == [5]
    assert [e.message.seq for e in ev_s] == [6]


def test_unknown_session_gets_reset_then_new_ident() -> None:
    p = Pair()
    p.connect()
    p.client_session.queue(Message(1, "lost"))
    p.client.write_messages()
    p.client.data_to_send()  # never arrives
    p.client_session.requeue_sent()
    p.server_sessions.clear()  # the server restarted
    ev_c, _ = p.connect()
    types = [type(e) for e in ev_c]
    assert types == [ResetReceived, Ready]
    assert ev_c[0].full is True
    # A full reset discards the session's queues: the dispatcher hears remote_reset.
    assert p.client_session.unacked_count() == 0


def test_duplicate_message_dropped_by_session() -> None:
    s = Session(Policy.lossless_client())
    assert s.on_receive(1) and s.on_receive(2)
    assert not s.on_receive(2) and not s.on_receive(1)
    assert s.duplicates_dropped == 2


def test_requeue_keeps_sequence_numbers() -> None:
    s = Session(Policy.lossless_client())
    for i in range(3):
        s.queue(Message(1, i))
    sent = [s.pop_outgoing() for _ in range(3)]
    assert [m.seq for m in sent] == [1, 2, 3]
    s.on_ack(1)
    s.queue(Message(1, "new"))
    s.requeue_sent()
    assert s.out_seq == 1
    s.discard_requeued_up_to(2)
    again = [s.pop_outgoing() for _ in range(2)]
    assert [(m.front, m.seq) for m in again] == [(2, 3), ("new", 4)]


@given(st.lists(st.tuples(st.sampled_from(["queue", "take", "ack", "requeue"]),
                          st.integers(0, 5), st.sampled_from([64, 127, 196])), max_size=40),
       st.booleans())
@example(ops=[("queue", 1, 64), ("ack", 0, 64), ("take", 0, 64)], lossy=False)  # take(0) kept no ack
@settings(max_examples=examples(200), deadline=None)
def test_take_outgoing_matches_pop_outgoing(ops: list[tuple[str, int, int]],
                                            lossy: bool) -> None:
    """The batch path numbers, orders and keeps messages exactly as one pop at a time."""
    policy = Policy.lossy_client() if lossy else Policy.lossless_client()
    batch, single = Session(policy), Session(policy)
    made = 0
    for op, n, prio in ops:
        if op == "queue":
            for s in (batch, single):
                for i in range(n):
                    s.queue(Message(1, made + i, priority=prio))
            made += n
        elif op == "take":
            got = batch.take_outgoing(n)
            want = [single.pop_outgoing() for _ in range(min(n, _outgoing(single)))]
            assert [(m.front, m.seq, m.ack_seq) for m in got] == \
                [(m.front, m.seq, m.ack_seq) for m in want]
        elif op == "ack":
            for s in (batch, single):
                s.on_receive(s.in_seq + 1)
                s.on_ack(s.out_seq - n)
        else:
            for s in (batch, single):
                s.requeue_sent()
        a, b = batch, single
        assert (a.out_seq, a.queued_count, a.ack_pending, a.has_outgoing()) == \
            (b.out_seq, b.queued_count, b.ack_pending, b.has_outgoing())
        assert [m.front for m in a.sent] == [m.front for m in b.sent]
        assert [m.front for m in a.queued_messages()] == [m.front for m in b.queued_messages()]


def _outgoing(s: Session) -> int:
    return len(list(s.queued_messages()))


def test_wrong_frame_for_state_is_remote_error() -> None:
    cfg = make_config(EntityType.OSD, SERVER_ADDR)
    server = Connection(Role.SERVER, cfg)
    client_cfg = make_config(EntityType.CLIENT, CLIENT_ADDR)
    client = Connection(Role.CLIENT, client_cfg, Session(Policy.lossless_client()))
    server.receive_data(b"".join(bytes(x) for x in client.data_to_send()))  # banner only
    assert server.next_event() is NEED_DATA
    # A MESSAGE before the handshake is illegal.
    server.receive_data(frame_bytes(Tag.MESSAGE, [bytes(32)]))
    with pytest.raises(RemoteProtocolError, match="unexpected MESSAGE"):
        server.next_event()


def test_hello_twice_rejected() -> None:
    p = Pair()
    p.connect()
    p.server.receive_data(b"".join(bytes(x) for x in encode_control(Hello(8, CLIENT_ADDR))))
    with pytest.raises(RemoteProtocolError):
        p.server.next_event()


def test_transition_table_has_no_handler_gaps() -> None:
    for (_role, _state, _tag), (handler, _nxt) in TRANSITIONS.items():
        assert hasattr(Connection, handler), handler


def test_handshake_export_import_round_trip() -> None:
    """A reconnect read by one process can be finished by another (pool routing)."""
    p = Pair()
    p.connect()
    p.client_session.requeue_sent()
    p.client_session.connect_seq += 1
    p.client = Connection(Role.CLIENT, p.ccfg, p.client_session,
                          target_addr=EntityAddr(0, "127.0.0.1", 6800))
    p.server = Connection(Role.SERVER, p.scfg)
    _, ev_s = pump(p.client, p.server)
    req = [e for e in ev_s if isinstance(e, ReconnectRequest)]
    assert req
    state = p.server.export_handshake()
    other, ev = Connection.import_handshake(p.scfg, state)
    assert isinstance(ev, ReconnectRequest) and ev.request == req[0].request
    other.accept_reconnect(next(iter(p.server_sessions.values())))
    p.server = other
    ev_c, _ = pump(p.client, p.server)
    assert any(isinstance(e, Ready) and e.resumed for e in ev_c)


# -- the decision table ---------------------------------------------------------------------

def view(**kw: Any) -> SessionView:
    base = dict(closed=False, replacing=False, ready_or_standby=True, connecting=False,
                lossy=False, server_policy=True, client_cookie=1, server_cookie=2,
                peer_global_seq=5, connect_seq=3)
    base.update(kw)
    return SessionView(**base)  # type: ignore[arg-type]


def reconnect(**kw: Any) -> Any:
    from protocol.control import SessionReconnect
    base = dict(addrs=(CLIENT_ADDR,), client_cookie=1, server_cookie=2, global_seq=6,
                connect_seq=3, msg_seq=0)
    base.update(kw)
    return SessionReconnect(**base)


@pytest.mark.parametrize("existing,req,verdict", [
    (None, {}, Verdict.RESET),
    ({"closed": True}, {}, Verdict.RESET),
    ({"replacing": True}, {}, Verdict.RETRY_GLOBAL),
    ({}, {"client_cookie": 99}, Verdict.RESET),
    ({"server_cookie": 0}, {}, Verdict.RESET),
    ({"peer_global_seq": 10}, {}, Verdict.RETRY_GLOBAL),
    ({"connect_seq": 4}, {}, Verdict.RETRY),
    ({}, {}, Verdict.REUSE),
])
def test_reconnect_decision_table(existing: Any, req: Any, verdict: Verdict) -> None:
    v = None if existing is None else view(**existing)
    d = decide_reconnect(v, reconnect(**req), Policy.stateful_server(), SERVER_ADDR, CLIENT_ADDR)
    assert d.verdict is verdict


def test_reconnect_reset_full_follows_resetcheck() -> None:
    d = decide_reconnect(view(), reconnect(client_cookie=42), Policy.lossless_peer(),
                         SERVER_ADDR, CLIENT_ADDR)
    assert d.verdict is Verdict.RESET and d.full is False  # lossless_peer: no resetcheck


def test_ident_race_tie_break() -> None:
    from protocol.control import ClientIdent
    low, high = EntityAddr(1, "127.0.0.1", 1000), EntityAddr(1, "127.0.0.1", 2000)
    ident = ClientIdent((low,), high, 0, 9, 1, 0, 0, 77)
    racing = view(ready_or_standby=False, connecting=True, server_policy=False,
                  client_cookie=0, server_cookie=0, peer_global_seq=0)
    # We are `high`; the incoming peer is `low`: the lower address wins -> reuse incoming.
    assert decide_ident(racing, ident, Policy.lossless_peer(), high, low).verdict is Verdict.REUSE
    # We are `low`; the incoming peer is `high`: our outgoing wins -> WAIT.
    ident2 = ClientIdent((high,), low, 0, 9, 1, 0, 0, 77)
    assert decide_ident(racing, ident2, Policy.lossless_peer(), low, high).verdict is Verdict.WAIT


def test_wait_event_on_client() -> None:
    p = Pair()
    p.client = Connection(Role.CLIENT, p.ccfg, p.client_session,
                          target_addr=EntityAddr(0, "127.0.0.1", 6800))
    p.server = Connection(Role.SERVER, p.scfg)
    _, ev_s = pump(p.client, p.server)
    assert any(isinstance(e, IdentRequest) for e in ev_s)
    p.server.reject("wait")
    ev_c, _ = pump(p.client, p.server)
    assert [type(e) for e in ev_c] == [WaitReceived]
