"""The Messenger's knobs, typed and frozen: one value passed in, never patched later.

Apps turn their own ``app_config`` keys into one of these (``pool.apps``); nothing in
the messenger library reads string keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.frames import FrameLimits
from protocol.identity import IdentityCheck
from protocol.policy import Backoff
from protocol.retention import DEFAULT_CAPS, RetentionCaps

__all__ = ["MessengerConfig"]


@dataclass(frozen=True, slots=True)
class MessengerConfig:
    """What one Messenger is configured with; the defaults are Ceph's where it has one."""

    #: a connection not READY this long after its connect or accept is faulted
    #: (Ceph's ``ms_connection_ready_timeout``; ``msgr serve --handshake-timeout``)
    ready_timeout: float = 10.0
    #: a READY connection silent this long is faulted (``ms_connection_idle_timeout``)
    idle_timeout: float = 900.0
    #: a server forgets a session whose client stayed away this long (the client then
    #: gets SESSION_RESET and ms_handle_remote_reset: never silent loss)
    standby_timeout: float = 900.0
    #: receive throttles: messages and bytes held by dispatchers at once (0 = no limit)
    throttle_messages: int = 0
    throttle_bytes: int = 0
    #: stop reading a connection whose unsent output exceeds this (bytes), resume at half
    out_high_water: int = 4 * 1024 * 1024
    #: ...or whose queue of not-yet-encoded replies exceeds this many messages
    out_queue_limit: int = 4096
    #: refuse (with EBUSY) connections beyond this many; 0 = no cap
    max_connections: int = 0
    #: reconnect delays of lossless clients
    backoff: Backoff = Backoff()
    #: frame and segment size caps checked before allocating
    limits: FrameLimits = FrameLimits()
    #: how a client checks the identity a server names; None: by entity type
    #: (strict between cluster members, record for clients: see protocol.identity)
    identity_check: IdentityCheck | str | None = None
    #: server sessions kept without a connection (STANDBY) are bounded by these
    retention: RetentionCaps = DEFAULT_CAPS
    #: fault injection for tests: shut the socket down once per this many I/Os (0 = off)
    inject_socket_failures: int = 0
    #: top 24 bits of server cookies (0 = fully random): a pool puts slot+1 and the
    #: slot's generation here so any worker can tell who owns a session
    cookie_tag: int = 0
    #: seed of the messenger's random choices (fault injection, back-off jitter)
    seed: int | None = None
    #: the nonce of this messenger's entity_addr_t; None: random
    nonce: int | None = None
