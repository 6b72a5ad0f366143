"""What a :class:`~protocol.connection.Connection` reports from ``next_event()``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from .control import ClientIdent, EntityAddr, SessionReconnect
from .message import Message

__all__ = [
    "NEED_DATA", "Event", "IdentRequest", "KeepaliveAckReceived", "KeepaliveReceived",
    "MessageReceived", "Ready", "ReconnectRequest", "ResetReceived", "RetryReceived",
    "WaitReceived",
]


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Any = _NeedData()


# -- events ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ready:
    """Handshake complete; ``resumed`` when an existing session continued."""

    resumed: bool
    peer_type: int
    peer_addrs: tuple[EntityAddr, ...]
    #: the address we dialled, when the server named others and the identity check
    #: recorded them instead of refusing (port forwarding); None when they matched
    unnamed_target: EntityAddr | None = None


@dataclass(frozen=True, slots=True)
class IdentRequest:
    """Server: the client asks for a new session. Decide, then call accept_new_session()
    or reject()."""

    ident: ClientIdent
    peer_type: int


@dataclass(frozen=True, slots=True)
class ReconnectRequest:
    """Server: the client asks to resume a session. Decide, then accept_reconnect() or
    reject()."""

    request: SessionReconnect
    peer_type: int


@dataclass(frozen=True, slots=True)
class ResetReceived:
    """Client: the server has no (or a different) session. The connection already reset
    the session when ``full`` and sent CLIENT_IDENT; the owner notifies the dispatcher."""

    full: bool


@dataclass(frozen=True, slots=True)
class RetryReceived:
    """Client: the server asked us to retry with a higher connect_seq/global_seq (already
    done by the connection; informational)."""

    global_: bool
    value: int


@dataclass(frozen=True, slots=True)
class WaitReceived:
    """Client: the server's own outgoing connection wins a race; back off and retry."""


class MessageReceived:
    """A message arrived (delivered once per session, in order). A plain slotted class:
    one is built per message, and frozen dataclasses cost several times more to build."""

    __slots__ = ("message",)

    def __init__(self, message: Message) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"MessageReceived({self.message!r})"


@dataclass(frozen=True, slots=True)
class KeepaliveReceived:
    stamp: tuple[int, int]


@dataclass(frozen=True, slots=True)
class KeepaliveAckReceived:
    stamp: tuple[int, int]


Event = Union[Ready, IdentRequest, ReconnectRequest, ResetReceived, RetryReceived,
              WaitReceived, MessageReceived, KeepaliveReceived, KeepaliveAckReceived]
