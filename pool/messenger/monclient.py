"""A small synchronous client of a real ceph-mon: ping, get_version, command, status.

It is a Messenger of entity type client with Ceph's ``lossy_client`` policy, auth none,
speaking only Ceph messages (``Message(..., raw=True)`` with bodies from
:mod:`protocol.ceph.messages`). Every call runs the client's own EventCenter until the
answer arrives or the deadline passes. Like Ceph's MonClient it reconnects when the mon
went away: a lossy session that faulted is reset (the dispatcher hears
``ms_handle_reset``) and the next request opens a new one.

Errors are :class:`MonError` with words for a person: what happened, and what to do.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Self

from protocol.ceph.addr import parse_addr
from protocol.ceph.messages import (
    CephBody,
    MMonCommand,
    MMonCommandAck,
    MMonGetVersion,
    MMonGetVersionReply,
    MPing,
    message_name,
)
from protocol.features import EntityType
from protocol.message import Message
from protocol.policy import Policy
from transport.event_center import EventCenter

from .auth import AuthSettings
from .config import MessengerConfig
from .connection import AsyncConnection
from .states import ConnState
from .dispatcher import Dispatcher
from .messenger import Messenger

__all__ = ["MonClient", "MonError"]


_MAX_UNCLAIMED = 256


class MonError(Exception):
    """A mon could not be reached or refused us; the text says what to do."""


class _Inbox(Dispatcher):
    def __init__(self, on_reset: Callable[[AsyncConnection], None] | None) -> None:
        self.messages: list[Message] = []
        self.resets = 0
        self.connects = 0
        self._on_reset = on_reset

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        self.messages.append(msg)
        if len(self.messages) > _MAX_UNCLAIMED:  # unsolicited messages nobody waits for
            del self.messages[0]

    def ms_handle_connect(self, conn: AsyncConnection) -> None:
        self.connects += 1

    def ms_handle_reset(self, conn: AsyncConnection) -> None:
        self.resets += 1
        if self._on_reset is not None:
            self._on_reset(conn)


def _advice(reason: str) -> str:
    """What to do, unless the reason (AUTH_BAD_METHOD, IDENT_MISSING_FEATURES, msgr1
    banner: protocol.replies and protocol.frames word those) already says it."""
    low = reason.lower()
    if "refused" in low or "econnrefused" in low:
        return ("; nothing listens there: is ceph-mon running, and is the address its v2 "
                "(msgr2) address, e.g. v2:IP:3300?")
    if "rejected auth method" in low or "feature bits" in low or "msgr1" in low:
        return ""
    return "; check the mon's log (debug_ms = 20 shows the handshake)"


class MonClient:
    """One client session to the mon at ``mon`` (``v2:HOST:PORT``)."""

    def __init__(self, mon: str, *, name: str = "client.admin", timeout: float = 10.0,
                 on_reset: Callable[[AsyncConnection], None] | None = None,
                 config: MessengerConfig | None = None) -> None:
        try:
            addr = parse_addr(mon)
        except ValueError as exc:
            raise MonError(str(exc)) from None
        self.mon = mon
        self.addr = (addr.host, addr.port)
        self.timeout = timeout
        self.center = EventCenter(name="monclient")
        self.inbox = _Inbox(on_reset)
        try:
            self.msgr = Messenger(self.center, config, entity_type=EntityType.CLIENT,
                                  name=name, policy=Policy.lossy_client(),
                                  auth=AuthSettings(name=name))
        except BaseException:
            self.center.close()
            raise
        self.msgr.add_dispatcher(self.inbox)
        self.conn: AsyncConnection | None = None
        self.reconnects = 0
        self._tid = 0
        self._fsid: uuid.UUID | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self.msgr.shutdown()
        self.center.process_events(0)
        self.center.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> AsyncConnection:
        """The live session, or a new one (a reconnect after the mon went away)."""
        conn = self.conn
        if conn is not None and conn.state is not ConnState.CLOSED:
            return conn
        if conn is not None:
            self.reconnects += 1
        self.conn = self.msgr.connect(self.addr)
        self._wait(lambda: self.conn is not None and (self.conn.state is ConnState.READY
                                                      or self.conn.state is ConnState.CLOSED),
                   "the handshake")
        assert self.conn is not None
        if self.conn.state is ConnState.CLOSED:
            reason = self.conn.last_error or "connection closed during the handshake"
            raise MonError(f"could not talk to the mon at {self.mon}: {reason}"
                           f"{_advice(reason)}")
        return self.conn

    def _wait(self, cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                raise MonError(f"no answer from the mon at {self.mon} within {self.timeout}s "
                               f"({what}); is it up and in quorum?")
            self.center.process_events(min(left, 0.05))

    def wait_until(self, cond: Callable[[], bool], what: str) -> None:
        """Run the client's loop until ``cond()`` (bounded by the timeout)."""
        self._wait(cond, what)

    # -- requests --------------------------------------------------------------------------
    def request(self, body: CephBody, reply_type: int, tid: int = 0,
                match: Callable[[Message], bool] | None = None) -> Message:
        """Send ``body`` and wait for the first message of ``reply_type`` (and ``match``)."""
        conn = self.connect()
        front, middle, data = body.encode()
        inbox = self.inbox.messages
        conn.send_message(Message(body.TYPE, front, data, tid=tid, raw=True, middle=middle,
                                  version=body.VERSION, compat_version=body.COMPAT))
        found: list[Message] = []

        def got() -> bool:
            for i, m in enumerate(inbox):
                if m.type == reply_type and (match is None or match(m)):
                    found.append(inbox.pop(i))
                    return True
            if conn.state is ConnState.CLOSED:
                reason = conn.last_error or "the mon closed the connection"
                raise MonError(f"the mon at {self.mon} dropped the connection while we waited "
                               f"for {message_name(reply_type)}: {reason}{_advice(reason)}")
            return False

        self._wait(got, f"waiting for {message_name(reply_type)}")
        return found[0]

    def ping(self) -> tuple[float, dict[str, Any]]:
        """Round-trip time of an MPing (seconds) and the status JSON the mon answers with."""
        self.connect()
        t0 = time.perf_counter()
        reply = self.request(MPing(), MPing.TYPE)
        rtt = time.perf_counter() - t0
        ping = MPing.decode(reply.front, reply.middle, reply.data, reply.version)
        status: dict[str, Any] = json.loads(ping.status) if ping.status else {}
        return rtt, status

    def get_version(self, what: str) -> MMonGetVersionReply:
        self._tid += 1
        handle = self._tid
        reply = self.request(
            MMonGetVersion(handle, what), MMonGetVersionReply.TYPE,
            match=lambda m: MMonGetVersionReply.decode(m.front, version=m.version).handle
            == handle)
        return MMonGetVersionReply.decode(reply.front, version=reply.version)

    def fsid(self) -> uuid.UUID:
        """The cluster fsid (from the mon's answer to MPing; MMonCommand must carry it)."""
        if self._fsid is None:
            _rtt, status = self.ping()
            try:
                self._fsid = uuid.UUID(status["mon_status"]["monmap"]["fsid"])
            except (KeyError, TypeError, ValueError) as exc:
                raise MonError(f"the mon's MPing answer holds no fsid ({exc!r})") from None
        return self._fsid

    def command(self, cmd: dict[str, Any] | str, inbl: bytes = b"") -> MMonCommandAck:
        """Run one mon command (``{"prefix": "mon dump", "format": "json"}``)."""
        text = cmd if isinstance(cmd, str) else json.dumps(cmd)
        fsid = self.fsid()
        self._tid += 1
        tid = self._tid
        reply = self.request(MMonCommand(fsid, (text,), inbl), MMonCommandAck.TYPE, tid=tid,
                             match=lambda m: m.tid == tid)
        return MMonCommandAck.decode(reply.front, reply.middle, bytes(reply.data),
                                     reply.version)

    def status(self) -> dict[str, Any]:
        ack = self.command({"prefix": "status", "format": "json"})
        if ack.r != 0:
            raise MonError(f"mon refused 'status': r={ack.r} {ack.rs}")
        result: dict[str, Any] = json.loads(ack.outbl)
        return result
