"""A blocking msgr2 client for pool tests: the sans-I/O :class:`protocol.connection.Connection`
driven over a plain socket from the test process.

Thousands of sessions must open and vanish in seconds on two cores; a client Messenger
per session would cost an EventCenter each. This drives the very protocol code the
server runs, with nothing in between, and can record what it sent (the frames of a
valid session) for the hostile replays in ``test_hostile.py``.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol import features
from protocol.connection import (
    NEED_DATA,
    Config,
    Connection,
    MessageReceived,
    Ready,
    ResetReceived,
    Role,
)
from protocol.control import EntityAddr
from protocol.message import Message
from protocol.policy import Policy
from protocol.session import Session

__all__ = ["Abandoned", "RawClient", "SessionRecord", "abandon_session"]

#: the type of the messages these clients send (any value the echo app reflects)
MSG_TYPE = 0x4242


@dataclass
class SessionRecord:
    """What a finished session left behind: its cookies (to reconnect) and, when asked
    for, every byte the client wrote, one entry per write (banner, frames)."""

    nonce: int
    session: Session
    writes: list[bytes] = field(default_factory=list)


class Abandoned(Exception):
    """The ``on_send`` hook ended the session: the client vanished after that write."""


#: on_send(bytes the protocol wants written) -> (bytes to write instead, vanish after it)
SendHook = Callable[[bytes], tuple[bytes, bool]]


class RawClient:
    """One client session over one socket. Blocking, with a timeout on every read."""

    def __init__(self, port: int, *, nonce: int | None = None, session: Session | None = None,
                 record: bool = False, timeout: float = 10.0,
                 on_send: SendHook | None = None) -> None:
        self.nonce = nonce if nonce is not None else secrets.randbits(32) or 1
        self.session = session or Session(Policy.lossless_client())
        cfg = Config(entity_type=features.EntityType.CLIENT,
                     my_addr=EntityAddr(self.nonce, "", 0),
                     new_cookie=lambda: secrets.randbits(64) or 1)
        self.wire = Connection(Role.CLIENT, cfg, self.session,
                               target_addr=EntityAddr(0, "127.0.0.1", port))
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.record = record
        self.on_send = on_send
        self.writes: list[bytes] = []
        self.events: list[object] = []

    def close(self) -> None:
        self.sock.close()

    def _send(self) -> None:
        data = b"".join(bytes(b) for b in self.wire.data_to_send())
        if not data:
            return
        vanish = False
        if self.on_send is not None:
            data, vanish = self.on_send(data)
        if self.record:
            self.writes.append(data)
        if data:
            self.sock.sendall(data)
        if vanish:
            raise Abandoned("the send hook ended this session")

    def _pump(self) -> object:
        """The next protocol event, reading from the socket as needed."""
        while True:
            ev = self.wire.next_event()
            if ev is not NEED_DATA:
                self.events.append(ev)
                return ev
            self._send()
            chunk = self.sock.recv(256 * 1024)
            if not chunk:
                raise ConnectionResetError("the server closed the connection")
            self.wire.receive_data(chunk)

    def handshake(self) -> object:
        """Run the handshake to its first decisive event (Ready or ResetReceived)."""
        self._send()
        while True:
            ev = self._pump()
            if isinstance(ev, (Ready, ResetReceived)):
                self._send()
                return ev

    def exchange(self, payloads: list[bytes], front: object = None) -> list[Message]:
        """Send one message per payload, then read as many replies. The replies are never
        acknowledged: nothing is written after them."""
        for p in payloads:
            self.session.queue(Message(MSG_TYPE, front, data=p))
        self.wire.write_messages()
        self._send()
        got: list[Message] = []
        while len(got) < len(payloads):
            ev = self._pump()
            if isinstance(ev, MessageReceived):
                got.append(ev.message)
        return got


def abandon_session(port: int, payloads: list[bytes], *, record: bool = False) -> SessionRecord:
    """Open a lossless session, exchange ``payloads``, vanish without ending the session:
    the server keeps it (STANDBY) with every reply unacknowledged."""
    c = RawClient(port, record=record)
    try:
        ev = c.handshake()
        assert isinstance(ev, Ready), f"a new session was answered with {ev!r}"
        c.exchange(payloads)
    finally:
        c.close()
    return SessionRecord(c.nonce, c.session, c.writes)
