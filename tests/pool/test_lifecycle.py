"""The slot state machine and restart policy, without processes or clocks."""

from __future__ import annotations

import random

import pytest

from pool.supervisor.lifecycle import (
    LIVE_STATES,
    TRANSITIONS,
    Backoff,
    Event,
    FlapGuard,
    IllegalTransition,
    State,
    WorkerSlot,
)


def slot(**kw: object) -> WorkerSlot:
    return WorkerSlot(0, **kw)  # type: ignore[arg-type]


def test_happy_path_spawn_ready_accept_drain_exit() -> None:
    ws = slot()
    ws.spawned(pid=100, now=0.0)
    assert (ws.state, ws.pid, ws.generation) == (State.SPAWNING, 100, 1)
    ws.ready(now=0.5)
    ws.fire(Event.ACCEPTING)
    ws.fire(Event.DRAIN)
    assert ws.state is State.DRAINING
    ws.fire(Event.DRAINED)
    assert ws.state is State.QUIESCED
    assert ws.exited(0, now=1.0, rng=random.Random(1)) is None
    assert ws.state is State.EXITED and ws.pid == 0 and ws.restarts == 0


@pytest.mark.parametrize("state,event", [
    (State.EXITED, Event.READY),
    (State.EXITED, Event.ACCEPTING),
    (State.SPAWNING, Event.ACCEPTING),  # must report READY first
    (State.ACCEPTING, Event.SPAWN),  # one process per slot
    (State.DRAINING, Event.ACCEPTING),  # a retiring worker never takes work again
    (State.FAILED, Event.SPAWN),  # only an operator's scale (RETIRE) resets FAILED
    (State.EXITED, Event.DIED),
    (State.STOPPING, Event.DRAIN),
    (State.ACCEPTING, Event.DRAINED),  # only a retiring worker reports DRAINED
    (State.QUIESCED, Event.DIED),  # its exit is expected
])
def test_illegal_transitions_raise(state: State, event: Event) -> None:
    ws = slot(state=state)
    assert not ws.can(event)
    with pytest.raises(IllegalTransition) as info:
        ws.fire(event)
    assert info.value.state is state and event.value in str(info.value)
    assert ws.state is state  # unchanged


def test_table_is_the_only_source_of_transitions() -> None:
    # Every (state, event) pair is either in the table or raises: nothing implicit.
    for state in State:
        for event in Event:
            ws = slot(state=state)
            if (state, event) in TRANSITIONS:
                assert ws.fire(event) is TRANSITIONS[(state, event)]
            else:
                with pytest.raises(IllegalTransition):
                    ws.fire(event)


def test_every_state_is_reachable_from_exited() -> None:
    seen = {State.EXITED}
    frontier = [State.EXITED]
    while frontier:
        s = frontier.pop()
        for (src, _ev), dst in TRANSITIONS.items():
            if src is s and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    assert seen == set(State)


def test_crash_after_ready_restarts_with_growing_capped_backoff() -> None:
    rng = random.Random(7)
    ws = slot(backoff=Backoff(base=0.1, factor=2, cap=0.5, jitter=0.0))
    delays = []
    now = 0.0
    for _ in range(5):
        ws.spawned(pid=1, now=now)
        ws.ready(now=now + 0.1)
        ws.fire(Event.ACCEPTING)
        d = ws.exited(-9, now=now + 1.0, rng=rng)
        assert ws.state is State.BACKOFF and d is not None
        assert ws.restart_at == pytest.approx(now + 1.0 + d)
        delays.append(d)
        now += 2.0
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert ws.restarts == 5


def test_backoff_resets_after_a_stable_run() -> None:
    ws = slot(backoff=Backoff(base=0.1, jitter=0.0), stable_after=10.0)
    rng = random.Random(0)
    for _ in range(3):
        ws.spawned(1, 0.0)
        ws.ready(0.0)
        ws.exited(1, 1.0, rng)
    ws.spawned(1, 2.0)
    ws.ready(2.0)
    assert ws.exited(1, 100.0, rng) == pytest.approx(0.1)


def test_jitter_stays_within_bounds() -> None:
    b = Backoff(base=1.0, factor=2.0, cap=4.0, jitter=0.5)
    rng = random.Random(3)
    for attempt in range(6):
        raw = min(4.0, 2.0 ** attempt)
        for _ in range(50):
            assert raw * 0.5 <= b.delay(attempt, rng) <= raw


def test_flap_guard_counts_deaths_before_ready_in_a_sliding_window() -> None:
    g = FlapGuard(window=10.0, max_deaths=3)
    assert not g.record(0.0)
    assert not g.record(5.0)
    assert not g.record(11.0)  # the death at 0.0 left the window
    assert g.record(12.0)


def test_boot_failures_trip_the_flap_guard_to_failed() -> None:
    ws = slot(flap=FlapGuard(window=10.0, max_deaths=3))
    rng = random.Random(0)
    results = []
    for t in (0.0, 0.2, 0.6):
        ws.spawned(1, t)
        results.append(ws.exited(3, t + 0.1, rng))
    assert results[:2] != [None, None] and results[2] is None
    assert ws.state is State.FAILED
    assert ws.state not in LIVE_STATES
    ws.fire(Event.RETIRE)  # an operator's scale gives it another chance
    assert ws.state is State.EXITED


def test_deaths_after_ready_do_not_count_as_flapping() -> None:
    ws = slot(flap=FlapGuard(window=10.0, max_deaths=2))
    rng = random.Random(0)
    for t in range(5):
        ws.spawned(1, float(t))
        ws.ready(t + 0.1)
        ws.exited(-9, t + 0.5, rng)
        assert ws.state is State.BACKOFF


def test_stall_then_death_is_a_crash_unless_retiring() -> None:
    rng = random.Random(0)
    ws = slot()
    ws.spawned(1, 0.0)
    ws.ready(0.1)
    ws.fire(Event.ACCEPTING)
    ws.fire(Event.HEARTBEAT_TIMEOUT)
    assert ws.state is State.STALLED
    assert ws.exited(-6, 5.0, rng) is not None and ws.state is State.BACKOFF

    ws2 = slot()
    ws2.spawned(1, 0.0)
    ws2.ready(0.1)
    ws2.fire(Event.ACCEPTING)
    ws2.fire(Event.DRAIN)
    ws2.fire(Event.HEARTBEAT_TIMEOUT)
    assert ws2.exited(-9, 5.0, rng) is None and ws2.state is State.EXITED


def test_stop_paths() -> None:
    rng = random.Random(0)
    for before in (State.SPAWNING, State.READY, State.ACCEPTING, State.DRAINING, State.QUIESCED,
                   State.STALLED):
        ws = slot(state=before, pid=5)
        ws.fire(Event.STOP)
        assert ws.state is State.STOPPING
        assert ws.exited(0, 1.0, rng) is None and ws.state is State.EXITED
    ws = slot(state=State.BACKOFF)
    ws.fire(Event.STOP)
    assert ws.state is State.EXITED


def test_history_is_bounded() -> None:
    ws = slot()
    rng = random.Random(0)
    for t in range(100):
        ws.spawned(1, float(t))
        ws.ready(t + 0.1)
        ws.exited(1, t + 20.0, rng)
    assert len(ws.history) <= 32
