"""The two message families over a real handshake: asyncmsgr messages only to peers
whose banner announced asyncmsgr, Ceph (raw) messages to anyone, and the header's
version/compat_version carried through to the application."""

from __future__ import annotations

import pytest

from protocol import features as feat
from protocol.connection import MessageReceived
from protocol.errors import LocalProtocolError
from protocol.message import Message
from tests.protocol.test_connection import Pair, pump


def _received(events: list[object]) -> list[Message]:
    return [e.message for e in events if isinstance(e, MessageReceived)]


def test_asyncmsgr_peers_exchange_both_families() -> None:
    p = Pair()
    p.connect()
    assert p.client.peer_features & feat.ASYNCMSGR and p.server.peer_features & feat.ASYNCMSGR
    p.client_session.queue(Message(7, {"k": 1}))
    p.client_session.queue(Message(19, b"\x01raw", b"data", raw=True, middle=b"m",
                                   version=3, compat_version=2))
    _, ev_s = pump(p.client, p.server)
    a, c = _received(ev_s)
    assert (a.raw, a.type, a.front) == (False, 7, {"k": 1})
    assert (c.raw, c.type, c.front, bytes(c.middle), bytes(c.data), c.version,
            c.compat_version) == (True, 19, b"\x01raw", b"m", b"data", 3, 2)


def test_asyncmsgr_message_to_a_peer_without_the_bit_is_refused_unwritten() -> None:
    p = Pair()
    # The server plays a Ceph daemon: its banner carries REVISION_1 only.
    p.scfg.features_supported = feat.REVISION_1
    p.connect()
    assert p.client.is_ready and not p.client.peer_features & feat.ASYNCMSGR
    p.client_session.queue(Message(2, b"", raw=True))  # an MPing: fine
    assert p.client.write_messages() == 1
    p.client.data_to_send()
    p.client_session.queue(Message(7, {"k": 1}))
    with pytest.raises(LocalProtocolError, match="Ceph daemon") as info:
        p.client.write_messages()
    assert info.value.code == "ceph_peer" and not p.client.has_data_to_send()
