"""The AsyncConnection state table, driven without sockets (as test_lifecycle does)."""

from __future__ import annotations

import pytest

from pool.messenger.states import (
    TRANSITIONS, ConnEvent, ConnState, ConnStateMachine, IllegalTransition,
)


def _machine_in(state: ConnState) -> ConnStateMachine:
    """A bare machine brought to ``state`` by legal events only."""
    paths = {
        ConnState.CONNECTING: (True, []),
        ConnState.ACCEPTING: (False, []),
        ConnState.HANDSHAKE: (False, [ConnEvent.ACCEPTED]),
        ConnState.READY: (False, [ConnEvent.ACCEPTED, ConnEvent.READY]),
        ConnState.BACKOFF: (True, [ConnEvent.BACKOFF]),
        ConnState.STANDBY: (False, [ConnEvent.ADOPTED_STANDBY]),
        ConnState.CLOSED: (True, [ConnEvent.CLOSE]),
    }
    outgoing, events = paths[state]
    m = ConnStateMachine(outgoing)
    for e in events:
        m.fire(e)
    assert m.state is state
    return m


@pytest.mark.parametrize("row", sorted(TRANSITIONS, key=lambda r: (r[0].value, r[1].value)),
                         ids=lambda r: f"{r[0].name}-{r[1].value}")
def test_every_row(row: tuple[ConnState, ConnEvent]) -> None:
    state, event = row
    m = _machine_in(state)
    assert m.fire(event) is TRANSITIONS[row]
    assert m.state is TRANSITIONS[row]


def test_a_client_session_walks_connect_fault_reconnect_close() -> None:
    m = ConnStateMachine(outgoing=True)
    seen = [m.state]
    for e in (ConnEvent.DIAL, ConnEvent.CONNECTED, ConnEvent.READY, ConnEvent.DIAL,
              ConnEvent.CONNECTED, ConnEvent.BACKOFF, ConnEvent.DIAL, ConnEvent.STANDBY,
              ConnEvent.DIAL, ConnEvent.CLOSE):
        seen.append(m.fire(e))
    S = ConnState
    assert seen == [S.CONNECTING, S.CONNECTING, S.HANDSHAKE, S.READY, S.CONNECTING,
                    S.HANDSHAKE, S.BACKOFF, S.CONNECTING, S.STANDBY, S.CONNECTING, S.CLOSED]


@pytest.mark.parametrize("state,event", [
    (ConnState.CLOSED, ConnEvent.DIAL),          # nothing comes back from CLOSED
    (ConnState.CLOSED, ConnEvent.CLOSE),
    (ConnState.ACCEPTING, ConnEvent.READY),      # READY only after a handshake
    (ConnState.STANDBY, ConnEvent.BACKOFF),      # no socket, so no fault
    (ConnState.CONNECTING, ConnEvent.ACCEPTED),
])
def test_an_illegal_event_is_refused(state: ConnState, event: ConnEvent) -> None:
    m = _machine_in(state)
    with pytest.raises(IllegalTransition) as info:
        m.fire(event)
    assert info.value.state is state and event.value in str(info.value)
    assert m.state is state  # unchanged


def test_closed_is_terminal_and_every_live_state_can_close() -> None:
    assert not [r for r in TRANSITIONS if r[0] is ConnState.CLOSED]
    assert {s for s in ConnState if s is not ConnState.CLOSED} == {
        s for (s, e) in TRANSITIONS if e is ConnEvent.CLOSE}
    # every state is reachable from one of the two starts
    assert set(ConnState) == {ConnState.CONNECTING, ConnState.ACCEPTING} | set(TRANSITIONS.values())
