"""Every state change of a msgr2 :class:`~protocol.connection.Connection`, as data.

Two tables, and :meth:`Connection._fire` / the frame pump are their only readers; no
other code assigns ``Connection.state``:

- :data:`TRANSITIONS`: ``(role, state, frame tag) -> (handler, {outcome: next state})``.
  The pump decodes the frame's payload, calls the handler, and moves to the state of
  the :class:`Outcome` the handler returns (``None`` means :attr:`Outcome.DONE`). Where
  one frame can lead to several states the row lists each, with the condition it stands
  for (e.g. the client's AUTH_SIGNATURE: a server cookie means SESSION_RECONNECT).
  A row with no outcomes (:data:`FAULTS`) is a frame whose handler always refuses.
- :data:`LOCAL_TRANSITIONS`: ``(role, state, Local) -> next state`` for what is not a
  frame: the peer's banner, the owner's decisions (accept, reject), close, and handoff.

Two rules hold for every row: a handler that refuses the frame (``ProtocolError``)
faults the connection to CLOSED, and so does a frame that has no row in the current
state ("unexpected X frame in state Y"). MESSAGE frames have no row outside READY, and
in READY they never reach the table: the per-message fast path takes them first.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from .frames import Tag

__all__ = ["FAULTS", "LOCAL_TRANSITIONS", "TRANSITIONS", "Local", "Outcome", "Role", "Row",
           "State"]


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    BANNER = "banner"
    HELLO = "hello"
    AUTH = "auth"
    AUTH_SIGNATURE = "auth_signature"
    SESSION_CONNECTING = "session_connecting"      # client sent CLIENT_IDENT
    SESSION_RECONNECTING = "session_reconnecting"  # client sent SESSION_RECONNECT
    SESSION_ACCEPTING = "session_accepting"        # server waits for / decides on ident
    READY = "ready"
    CLOSED = "closed"


class Outcome(enum.Enum):
    """Which of a row's next states its handler chose."""

    DONE = "done"                # the row's one next state
    AUTH_MORE = "auth_more"      # server: the auth method wants another round trip
    NEW_SESSION = "new_session"  # client: no server cookie yet, CLIENT_IDENT sent
    RECONNECT = "reconnect"      # client: a server cookie, SESSION_RECONNECT sent


class Local(enum.Enum):
    """Triggers that are not a frame."""

    BANNER = "banner"                    # the peer's banner arrived and was accepted
    ACCEPT_SESSION = "accept_session"    # server: accept_new_session()
    ACCEPT_RECONNECT = "accept_reconnect"  # server: accept_reconnect()
    REJECT = "reject"                    # server: reject(); the client may ask again
    CLOSE = "close"                      # close(), from any state
    EXPORT_READY = "export_ready"        # the session moves to another process
    RESTORE_READY = "restore_ready"      # ...and the handoff was refused: keep serving
    IMPORT_HANDSHAKE = "import_handshake"  # a fresh connection adopts an exported one
    IMPORT_READY = "import_ready"        # a fresh connection continues a migrated session


#: (handler name, next state per outcome)
Row = tuple[str, Mapping[Outcome, State]]

_C, _S = Role.CLIENT, Role.SERVER
_DONE = Outcome.DONE
#: the outcomes of a row whose handler always refuses (the connection faults to CLOSED)
FAULTS: Mapping[Outcome, State] = {}


def _to(state: State) -> Mapping[Outcome, State]:
    return {_DONE: state}


_AUTH_ROUND = {Outcome.AUTH_MORE: State.AUTH, _DONE: State.AUTH_SIGNATURE}

TRANSITIONS: dict[tuple[Role, State, int], Row] = {
    (_C, State.HELLO, Tag.HELLO): ("_on_hello", _to(State.AUTH)),
    (_S, State.HELLO, Tag.HELLO): ("_on_hello", _to(State.AUTH)),
    (_C, State.AUTH, Tag.AUTH_DONE): ("_on_auth_done", _to(State.AUTH_SIGNATURE)),
    (_C, State.AUTH, Tag.AUTH_REPLY_MORE): ("_on_auth_reply_more", _to(State.AUTH)),
    (_C, State.AUTH, Tag.AUTH_BAD_METHOD): ("_on_auth_bad_method", FAULTS),
    # the server's auth method answers "more" (AUTH_REPLY_MORE), "done" (AUTH_DONE and
    # our AUTH_SIGNATURE) or refuses (AUTH_BAD_METHOD, then the fault)
    (_S, State.AUTH, Tag.AUTH_REQUEST): ("_on_auth_request", _AUTH_ROUND),
    (_S, State.AUTH, Tag.AUTH_REQUEST_MORE): ("_on_auth_request_more", _AUTH_ROUND),
    # the client resumes when its session knows a server cookie, else starts one
    (_C, State.AUTH_SIGNATURE, Tag.AUTH_SIGNATURE): ("_on_server_signature", {
        Outcome.NEW_SESSION: State.SESSION_CONNECTING,
        Outcome.RECONNECT: State.SESSION_RECONNECTING}),
    (_S, State.AUTH_SIGNATURE, Tag.AUTH_SIGNATURE): ("_on_client_signature",
                                                     _to(State.SESSION_ACCEPTING)),
    # the owner decides (IdentRequest / ReconnectRequest, see LOCAL_TRANSITIONS); missing
    # features are answered with IDENT_MISSING_FEATURES and the client may ask again
    (_S, State.SESSION_ACCEPTING, Tag.CLIENT_IDENT): ("_on_client_ident",
                                                      _to(State.SESSION_ACCEPTING)),
    (_S, State.SESSION_ACCEPTING, Tag.SESSION_RECONNECT): ("_on_reconnect",
                                                           _to(State.SESSION_ACCEPTING)),
    (_C, State.SESSION_CONNECTING, Tag.SERVER_IDENT): ("_on_server_ident", _to(State.READY)),
    (_C, State.SESSION_CONNECTING, Tag.IDENT_MISSING_FEATURES): ("_on_missing_features",
                                                                 FAULTS),
    (_C, State.SESSION_CONNECTING, Tag.WAIT): ("_on_wait", _to(State.CLOSED)),
    (_C, State.SESSION_RECONNECTING, Tag.SESSION_RECONNECT_OK): ("_on_reconnect_ok",
                                                                 _to(State.READY)),
    # RESET: the client sends CLIENT_IDENT; RETRY / RETRY_GLOBAL: SESSION_RECONNECT again
    (_C, State.SESSION_RECONNECTING, Tag.SESSION_RESET): ("_on_session_reset",
                                                          _to(State.SESSION_CONNECTING)),
    (_C, State.SESSION_RECONNECTING, Tag.SESSION_RETRY): ("_on_retry",
                                                          _to(State.SESSION_RECONNECTING)),
    (_C, State.SESSION_RECONNECTING, Tag.SESSION_RETRY_GLOBAL): (
        "_on_retry_global", _to(State.SESSION_RECONNECTING)),
    (_C, State.SESSION_RECONNECTING, Tag.WAIT): ("_on_wait", _to(State.CLOSED)),
    (_C, State.READY, Tag.ACK): ("_on_ack", _to(State.READY)),
    (_S, State.READY, Tag.ACK): ("_on_ack", _to(State.READY)),
    (_C, State.READY, Tag.KEEPALIVE2): ("_on_keepalive", _to(State.READY)),
    (_S, State.READY, Tag.KEEPALIVE2): ("_on_keepalive", _to(State.READY)),
    (_C, State.READY, Tag.KEEPALIVE2_ACK): ("_on_keepalive_ack", _to(State.READY)),
    (_S, State.READY, Tag.KEEPALIVE2_ACK): ("_on_keepalive_ack", _to(State.READY)),
}

LOCAL_TRANSITIONS: dict[tuple[Role, State, Local], State] = {
    **{(r, State.BANNER, Local.BANNER): State.HELLO for r in Role},
    (_S, State.SESSION_ACCEPTING, Local.ACCEPT_SESSION): State.READY,
    (_S, State.SESSION_ACCEPTING, Local.ACCEPT_RECONNECT): State.READY,
    (_S, State.SESSION_ACCEPTING, Local.REJECT): State.SESSION_ACCEPTING,
    **{(r, s, Local.CLOSE): State.CLOSED for r in Role for s in State},
    **{(r, State.READY, Local.EXPORT_READY): State.CLOSED for r in Role},
    **{(r, State.CLOSED, Local.RESTORE_READY): State.READY for r in Role},
    (_S, State.BANNER, Local.IMPORT_HANDSHAKE): State.SESSION_ACCEPTING,
    **{(r, State.BANNER, Local.IMPORT_READY): State.READY for r in Role},
}
