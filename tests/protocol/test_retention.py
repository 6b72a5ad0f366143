"""The retention ledger (which absent sessions a server keeps) and Session.compact."""

from __future__ import annotations

import pytest

from protocol.message import Message
from protocol.policy import Policy
from protocol.retention import RetentionCaps, RetentionLedger
from protocol.session import MESSAGE_OVERHEAD, Session, retained_cost


def test_count_cap_evicts_the_longest_idle_not_the_first_retained() -> None:
    led: RetentionLedger[str] = RetentionLedger(RetentionCaps(3, 0, 0))
    # Retained in this order, but "b" has been idle longest (an idle timeout fault).
    assert led.retain("a", 10, idle_since=50.0) == []
    assert led.retain("b", 10, idle_since=5.0) == []
    assert led.retain("c", 10, idle_since=60.0) == []
    assert led.retain("d", 10, idle_since=70.0) == ["b"]
    assert led.retain("e", 10, idle_since=80.0) == ["a"]
    assert len(led) == 3 and led.total_bytes == 30 and led.evicted == 2
    assert "b" not in led and "c" in led


def test_session_over_its_byte_cap_is_evicted_at_once() -> None:
    led: RetentionLedger[str] = RetentionLedger(RetentionCaps(0, 100, 0))
    assert led.retain("small", 100, 1.0) == []
    assert led.retain("big", 101, 2.0) == ["big"]
    assert "big" not in led and led.total_bytes == 100 and led.evicted == 1
    # Growing past the cap while retained (replies queued for the absent client).
    assert led.grow("small", 1) == ["small"]
    assert len(led) == 0 and led.total_bytes == 0 and led.evicted == 2


def test_total_byte_cap_evicts_oldest_until_under() -> None:
    led: RetentionLedger[int] = RetentionLedger(RetentionCaps(0, 0, 1000))
    for i in range(4):
        assert led.retain(i, 300, float(i)) == ([] if i < 3 else [0])
    assert led.total_bytes == 900
    assert led.retain(9, 700, 9.0) == [1, 2]
    assert led.total_bytes == 1000 and sorted([k for k in range(10) if k in led]) == [3, 9]
    assert led.grow(3, 1) == [3]  # 3 is the oldest idle, even though it grew
    assert led.grow(42, 5) == []  # not retained: nothing to account


def test_release_and_re_retain_keep_totals_exact_and_the_heap_bounded() -> None:
    led: RetentionLedger[int] = RetentionLedger(RetentionCaps(10, 0, 0))
    for round_ in range(200):
        for k in range(10):
            led.retain(k, k + round_, float(round_ * 10 + k))
        for k in range(0, 10, 2):
            assert led.release(k)
        assert not led.release(0)
        assert led.total_bytes == sum(k + round_ for k in range(1, 10, 2))
    # Stale heap entries of resumed sessions are dropped, not accumulated.
    assert led.heap_entries <= 2 * len(led) + 64 + 10
    # A resumed-then-retained-again session is ordered by its new idle time.
    led2: RetentionLedger[str] = RetentionLedger(RetentionCaps(2, 0, 0))
    led2.retain("x", 1, 1.0)
    led2.retain("y", 1, 2.0)
    led2.release("x")
    led2.retain("x", 1, 3.0)
    assert led2.retain("z", 1, 4.0) == ["y"]


def test_caps_refuse_negative_and_non_integer_values() -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        RetentionCaps(max_sessions=-1)
    with pytest.raises(ValueError, match="max_total_bytes"):
        RetentionCaps(max_total_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot retain"):
        RetentionLedger[str]().retain("a", -1, 0.0)


def test_compact_copies_payload_views_out_of_the_receive_buffer() -> None:
    chunk = bytearray(256 * 1024)
    s = Session(Policy.stateful_server())
    for i in range(3):
        s.queue(Message(1, {"i": i}, data=memoryview(chunk)[i * 100:i * 100 + 50]))
    s.take_outgoing(2)  # two in `sent`, one still queued
    cost = s.compact()
    msgs = list(s.sent) + list(s.queued_messages())
    assert all(type(m.data) is bytes and len(m.data) == 50 for m in msgs)
    assert cost == sum(50 + len(m.encoded_front()) + MESSAGE_OVERHEAD for m in msgs)
    # No view into the chunk survives: it can be resized (a bytearray with exported
    # views refuses), i.e. it would be freed once its owner drops it.
    chunk.extend(b"x")
    assert retained_cost(Message(1, None, data=b"abc")) == 3 + MESSAGE_OVERHEAD
