"""One socket's worth of msgr2: the handshake and the frame exchange, sans I/O.

Usage (h11 shape, with an outbox because replies arise from input):

    conn = Connection(Role.CLIENT, config, session=Session(policy))
    out = conn.data_to_send()            # banner; write these buffers
    conn.receive_data(bytes_from_peer)   # or get_buffer()/buffer_updated() for zero copy
    while (ev := conn.next_event()) is not NEED_DATA:
        ...                              # Ready, MessageReceived, IdentRequest, ...
    conn.write_messages()                # encode queued session messages into the outbox

Handshake (crc mode). Both roles first exchange banners, then HELLO:

    client                                   server
    banner, HELLO            ─────────▶      banner, HELLO
    AUTH_REQUEST             ─────────▶      AUTH_DONE, AUTH_SIGNATURE
    AUTH_SIGNATURE           ─────────▶
    CLIENT_IDENT | SESSION_RECONNECT ──▶      (owner decides: IdentRequest/ReconnectRequest)
                             ◀─────────      SERVER_IDENT | RECONNECT_OK | RESET | RETRY* | WAIT
    READY: MESSAGE / ACK / KEEPALIVE2 / KEEPALIVE2_ACK in both directions

Every legal (role, state, tag) lives in :data:`protocol.transitions.TRANSITIONS` (the code
obeys only that table and LOCAL_TRANSITIONS); anything else is a remote protocol error
that faults the connection (never the worker). The owner supplies time, randomness and
the session registry, so the whole exchange is testable without sockets.

Where the parts live (all re-exported here):

- :mod:`protocol.transitions`: Role, State and the tables;
- :mod:`protocol.events`: what ``next_event()`` returns; :mod:`protocol.config`: Config;
- :mod:`protocol.exchange`: the stream (I/O surface, the pump, outbox, secure mode, READY);
- :mod:`protocol.handshake`, :mod:`protocol.client_handshake`,
  :mod:`protocol.server_handshake`: the table's handlers, shared and per role;
- :mod:`protocol.handoff`: a READY stream moving to another process.
"""


from __future__ import annotations

from .client_handshake import ClientHandshake
from .config import Config
from .events import (
    NEED_DATA, Event, IdentRequest, KeepaliveAckReceived, KeepaliveReceived, MessageReceived,
    Ready, ReconnectRequest, ResetReceived, RetryReceived, WaitReceived,
)
from .handoff import Handoff
from .server_handshake import ServerHandshake
from .transitions import LOCAL_TRANSITIONS, TRANSITIONS, Local, Outcome, Role, State

__all__ = [
    "LOCAL_TRANSITIONS", "NEED_DATA", "TRANSITIONS", "Config", "Connection", "Event",
    "IdentRequest", "KeepaliveAckReceived", "KeepaliveReceived", "Local", "MessageReceived",
    "Outcome", "Ready", "ReconnectRequest", "ResetReceived", "RetryReceived", "Role", "State",
    "WaitReceived",
]


class Connection(ClientHandshake, ServerHandshake, Handoff):
    """The msgr2 exchange over one socket, either role. Not thread-safe; owned by one
    event loop. The handlers of both roles are present; the table picks by role."""
