"""Session.export_state / Session.from_state: a session moved to another process (through
msgpack, as the pool's handoff carries it) continues exactly where it stopped, and junk
is refused with SessionStateError, never another exception."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.message import Message
from protocol.policy import Policy
from protocol.session import MAX_STATE_MESSAGES, STATE_VERSION, Session, SessionStateError

POLICY = Policy.stateful_server()

fronts = st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=8),
                   st.dictionaries(st.text(max_size=4), st.binary(max_size=8), max_size=3))
messages = st.builds(
    lambda t, front, data, prio, tid, raw, middle: Message(
        t, (msgpack.packb(front) if front is not None else None) if raw else front,
        data, prio, tid, raw=raw, middle=middle if raw else b"",
        version=3 if raw else 1, compat_version=2 if raw else 1),
    st.integers(0, 0x7FFF), fronts, st.binary(max_size=32),
    st.sampled_from([64, 127, 196, 255]), st.integers(0, 2**64 - 1), st.booleans(),
    st.binary(max_size=8))
#: a session's history: queue, send some, ack some, fault (requeue), replay
steps = st.lists(st.one_of(
    st.tuples(st.just("queue"), messages),
    st.tuples(st.just("send"), st.integers(0, 4)),
    st.tuples(st.just("ack"), st.integers(0, 3)),
    st.tuples(st.just("receive"), st.integers(1, 3)),
    st.tuples(st.just("requeue"), st.just(0))), max_size=30)


def _play(s: Session, history: list[tuple[str, Any]]) -> None:
    for op, arg in history:
        if op == "queue":
            s.queue(arg)
        elif op == "send":
            s.take_outgoing(arg)
        elif op == "ack" and s.sent:
            s.on_ack(s.sent[0].seq + arg - 1)
        elif op == "receive":
            s.on_receive(s.in_seq + arg)
        elif op == "requeue":
            s.requeue_sent()


def _msg(m: Message) -> tuple[Any, ...]:
    # A Ceph message's front is its bytes (None and b"" are the same empty segment).
    return (m.type, m.encoded_front() if m.raw else m.front, bytes(m.data), m.priority, m.tid, m.flags, m.seq, m.ack_seq,
            m.raw, bytes(m.middle), m.version, m.compat_version, m.encoded_front())


def _view(s: Session) -> tuple[Any, ...]:
    return (s.out_seq, s.in_seq, s.client_cookie, s.server_cookie, s.connect_seq,
            s.global_seq, s.peer_global_seq, s.ack_pending,
            [_msg(m) for m in s.sent], [_msg(m) for m in s.requeued],
            [_msg(m) for m in s.queued_messages()], s.queued_count)


def _through_msgpack(state: object) -> Any:
    return msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False)


def _session(history: list[tuple[str, Any]], cookies: tuple[int, int, int, int, int]) -> Session:
    s = Session(POLICY)
    (s.client_cookie, s.server_cookie, s.connect_seq, s.global_seq,
     s.peer_global_seq) = cookies
    _play(s, history)
    return s


cookies = st.tuples(*[st.integers(0, 2**64 - 1)] * 5)


@given(steps, cookies, steps)
def test_round_trip_continues_the_same_session(history: list[tuple[str, Any]],
                                               ck: tuple[int, int, int, int, int],
                                               after: list[tuple[str, Any]]) -> None:
    s = _session(history, ck)
    moved = Session.from_state(POLICY, _through_msgpack(s.export_state()))
    assert _view(moved) == _view(s)
    # Both go on identically: same numbering, same replay, same acks.
    _play(s, after)
    _play(moved, after)
    assert _view(moved) == _view(s)
    out_a = s.take_outgoing(1000)
    out_b = moved.take_outgoing(1000)
    assert [_msg(m) for m in out_b] == [_msg(m) for m in out_a]


def test_state_is_plain_and_versioned() -> None:
    s = Session(POLICY)
    s.queue(Message(7, {"k": b"v"}, b"data"))
    s.take_outgoing(1)
    s.queue(Message(8, None))
    state = s.export_state()
    assert state["v"] == STATE_VERSION
    assert _through_msgpack(state) == state  # only msgpack-native values inside
    assert len(state["sent"]) == 1 and len(state["queued"]) == 1 and state["requeued"] == 0


def _good() -> dict[str, Any]:
    s = Session(POLICY)
    s.queue(Message(7, {"k": 1}, b"x"))
    s.take_outgoing(1)
    s.queue(Message(9, [1, 2]))
    s.requeue_sent()
    return dict(_through_msgpack(s.export_state()))


BAD: list[tuple[str, Any]] = [
    ("not a map", [1, 2, 3]),
    ("missing key", {k: v for k, v in _good().items() if k != "in_seq"}),
    ("extra key", {**_good(), "junk": 1}),
    ("future version", {**_good(), "v": STATE_VERSION + 1}),
    ("negative seq", {**_good(), "out_seq": -1}),
    ("seq too wide", {**_good(), "in_seq": 2**64}),
    ("bool as int", {**_good(), "ack_pending": True}),
    ("str as int", {**_good(), "connect_seq": "3"}),
    ("sent not a list", {**_good(), "sent": b"x"}),
    ("message not a list", {**_good(), "sent": [b"x"]}),
    ("message raw flag", {**_good(), "sent": [[1, b"\0" * 41]]}),
    ("message segment type", {**_good(), "sent": [[False, "header"]]}),
    ("short header", {**_good(), "sent": [[False, b"\0" * 40]]}),
    ("too many segments", {**_good(), "sent": [[False] + [b""] * 5]}),
    ("bad front", {**_good(), "queued": [[False, _good()["queued"][0][1], b"\xc1"]]}),
    ("requeued beyond queued", {**_good(), "requeued": 5}),
    ("replay out of order", {**_good(), "queued": _good()["queued"] * 2, "requeued": 2}),
    ("too many messages", {**_good(), "sent": [[False, b""]] * (MAX_STATE_MESSAGES + 1)}),
]


@pytest.mark.parametrize("state", [b for _, b in BAD], ids=[n for n, _ in BAD])
def test_junk_is_refused_with_a_clear_error(state: Any) -> None:
    assert Session.from_state(POLICY, _good()).unacked_count() == 2
    with pytest.raises(SessionStateError, match="session state"):
        Session.from_state(POLICY, state)


leaves = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64 + 1), st.binary(max_size=50),
                   st.text(max_size=5))
junk = st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.sampled_from(sorted(_good())), c, max_size=4), max_leaves=20)


@given(st.sampled_from(sorted(_good())), junk)
def test_any_field_replaced_by_junk_is_refused_or_valid(key: str, value: Any) -> None:
    state = {**_good(), key: value}
    try:
        s = Session.from_state(POLICY, state)
    except SessionStateError:
        return
    # Accepted: then it is a usable session that exports what it imported.
    assert Session.from_state(POLICY, s.export_state()).unacked_count() == s.unacked_count()
