"""The AsyncConnection state table: every transition of a connection is one row here.

Pure: no sockets, no clocks. :class:`ConnStateMachine` holds ``state`` and its
:meth:`~ConnStateMachine.fire` is the only writer; an event the table does not allow in
the current state raises :class:`IllegalTransition` (a messenger bug, never peer input:
what a peer sends reaches this table only through the handshake's own table)::

    CONNECTING ─connected─▶ HANDSHAKE ─ready─▶ READY ─┬─backoff─▶ BACKOFF ─dial─▶ CONNECTING
    ACCEPTING ──accepted──▶ HANDSHAKE                 ├─dial─▶ CONNECTING   (reconnect at once)
                                                      ├─standby─▶ STANDBY   (server / idle)
                                                      └─close─▶ CLOSED
    HANDSHAKE | READY | STANDBY ──handed_off──▶ CLOSED   (socket or session moved on)
    any live state but ACCEPTING ──replaced──▶ HANDSHAKE  (a newer socket: reuse_connection)
    ACCEPTING ──adopted_standby──▶ STANDBY                (a migrated session, no socket)

Which fault event fires follows Ceph's ``ProtocolV2::_fault`` (notes §2.2) and is
decided in ``AsyncConnection.fault``: lossy → ``close`` (and ``ms_handle_reset``);
otherwise ``dial`` at once if the session had been READY, ``backoff`` (a doubling delay)
if it was still connecting, or ``standby`` (server policy; standby policy with nothing
queued).
"""

from __future__ import annotations

import enum

__all__ = ["ConnEvent", "ConnState", "ConnStateMachine", "IllegalTransition", "TRANSITIONS"]


class ConnState(enum.Enum):
    CONNECTING = "connecting"
    ACCEPTING = "accepting"
    HANDSHAKE = "handshake"
    READY = "ready"
    BACKOFF = "backoff"
    STANDBY = "standby"
    CLOSED = "closed"


class ConnEvent(enum.Enum):
    DIAL = "dial"                        # start a connect attempt
    CONNECTED = "connected"              # the dialled socket is up: the handshake starts
    ACCEPTED = "accepted"                # serve an accepted (or handed-over) socket
    REPLACED = "replaced"                # the peer's newer socket takes over this session
    READY = "ready"                      # the handshake is done (or a session was imported)
    ADOPTED_STANDBY = "adopted_standby"  # a migrated session whose client is away
    STANDBY = "standby"                  # fault: keep the session, wait for the peer
    BACKOFF = "backoff"                  # fault: dial again after a delay
    CLOSE = "close"                      # gone for good: mark_down, lossy fault, expiry
    HANDED_OFF = "handed_off"            # socket and/or session moved elsewhere, no news


S, E = ConnState, ConnEvent
_LIVE = (S.CONNECTING, S.ACCEPTING, S.HANDSHAKE, S.READY, S.BACKOFF, S.STANDBY)
#: The one place transitions live: (state, event) -> next state.
TRANSITIONS: dict[tuple[ConnState, ConnEvent], ConnState] = {
    # a new session dials from CONNECTING; a client in standby dials when it has work;
    # a fault after READY dials at once; a back-off timer dials when it fires
    **{(s, E.DIAL): S.CONNECTING for s in (S.CONNECTING, S.READY, S.BACKOFF, S.STANDBY)},
    (S.CONNECTING, E.CONNECTED): S.HANDSHAKE,
    (S.ACCEPTING, E.ACCEPTED): S.HANDSHAKE,
    # the registry holds only sessions that are past ACCEPTING
    **{(s, E.REPLACED): S.HANDSHAKE
       for s in (S.CONNECTING, S.HANDSHAKE, S.READY, S.BACKOFF, S.STANDBY)},
    (S.HANDSHAKE, E.READY): S.READY,
    (S.ACCEPTING, E.ADOPTED_STANDBY): S.STANDBY,
    # faults come from a socket (or a timeout on one): the states that have one
    **{(s, E.STANDBY): S.STANDBY for s in (S.CONNECTING, S.ACCEPTING, S.HANDSHAKE, S.READY)},
    **{(s, E.BACKOFF): S.BACKOFF for s in (S.CONNECTING, S.HANDSHAKE, S.READY)},
    **{(s, E.CLOSE): S.CLOSED for s in _LIVE},
    # a reconnect routed to its owner (HANDSHAKE), a socket reused by another session
    # (HANDSHAKE), a session migrated on scale-down (READY, STANDBY)
    **{(s, E.HANDED_OFF): S.CLOSED for s in (S.HANDSHAKE, S.READY, S.STANDBY)},
}
del S, E


class IllegalTransition(RuntimeError):
    """An event the table does not allow in the current state (a messenger bug)."""

    def __init__(self, state: ConnState, event: ConnEvent) -> None:
        super().__init__(f"connection event {event.value!r} is not allowed in state "
                         f"{state.name}")
        self.state, self.event = state, event


class ConnStateMachine:
    """``state`` and its one writer. AsyncConnection is one; tests drive it bare."""

    __slots__ = ("state",)

    def __init__(self, outgoing: bool) -> None:
        self.state = ConnState.CONNECTING if outgoing else ConnState.ACCEPTING

    def fire(self, event: ConnEvent) -> ConnState:
        """Apply ``event``; returns the new state. Raises IllegalTransition (state unchanged)."""
        try:
            new = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(self.state, event) from None
        self.state = new
        return new
