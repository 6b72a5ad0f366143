"""Shared-secret auth and secure mode, driven in pairs without I/O."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any

import pytest

from protocol.auth import AuthStats, SecretClientAuth, SecretServerAuth
from protocol.connection import (
    NEED_DATA, Config, Connection, IdentRequest, MessageReceived, Ready, Role, State,
)
from protocol.control import MODE_CRC, MODE_SECURE, EntityAddr
from protocol.errors import RemoteProtocolError
from protocol.message import Message
from protocol.policy import Policy
from protocol.session import Session
from protocol.transcript import Transcript

KEY = bytes(range(32))
KEYRING = {"client.a": KEY}


def configs(client_key: bytes = KEY, name: str = "client.a", mode: int = MODE_CRC,
            stats: AuthStats | None = None, seen: OrderedDict | None = None) -> tuple[Config, Config]:
    st = stats or AuthStats()
    sn = seen if seen is not None else OrderedDict()
    cookies = itertools.count(1)
    c = Config(entity_type=8, my_addr=EntityAddr(1, "", 0),
               client_auth=lambda: SecretClientAuth(name, client_key, (mode,)),
               new_cookie=lambda: next(cookies))
    s = Config(entity_type=4, my_addr=EntityAddr(2, "127.0.0.1", 6800),
               server_auth=lambda: SecretServerAuth(KEYRING, mode, st, sn),
               new_cookie=lambda: next(cookies))
    return c, s


def run(client: Connection, server: Connection, tamper: Any = None) -> tuple[list, list]:
    ev_c: list = []
    ev_s: list = []
    for _ in range(30):
        client.write_messages()
        server.write_messages()
        moved = False
        for src, dst, evs, is_c2s in ((client, server, ev_s, True), (server, client, ev_c, False)):
            data = b"".join(bytes(b) for b in src.data_to_send())
            if data:
                moved = True
                if tamper is not None:
                    data = tamper(data, is_c2s)
                dst.receive_data(data)
            while (ev := dst.next_event()) is not NEED_DATA:
                evs.append(ev)
                if isinstance(ev, IdentRequest):
                    dst.accept_new_session(Session(Policy.stateful_server()), 77)
        if not moved:
            break
    return ev_c, ev_s


def pair(**kw: Any) -> tuple[Connection, Connection]:
    c, s = configs(**kw)
    client = Connection(Role.CLIENT, c, Session(Policy.lossless_client()),
                        target_addr=EntityAddr(0, "127.0.0.1", 6800))
    return client, Connection(Role.SERVER, s)


@pytest.mark.parametrize("mode", [MODE_CRC, MODE_SECURE])
def test_secret_auth_reaches_ready_and_carries_messages(mode: int) -> None:
    client, server = pair(mode=mode)
    ev_c, _ = run(client, server)
    assert any(isinstance(e, Ready) for e in ev_c)
    assert client.secure == (mode == MODE_SECURE) and server.secure == client.secure
    assert client.session is not None
    client.session.queue(Message(1, {"k": "v"}, data=b"x" * 5000))
    _, ev_s = run(client, server)
    msgs = [e.message for e in ev_s if isinstance(e, MessageReceived)]
    assert [m.front for m in msgs] == [{"k": "v"}] and bytes(msgs[0].data) == b"x" * 5000


def test_secure_mode_hides_the_payload_on_the_wire() -> None:
    client, server = pair(mode=MODE_SECURE)
    run(client, server)
    assert client.session is not None
    client.session.queue(Message(1, "needle-in-haystack"))
    client.write_messages()
    wire = b"".join(bytes(b) for b in client.data_to_send())
    assert b"needle-in-haystack" not in wire
    server.receive_data(wire)
    assert isinstance(server.next_event(), MessageReceived)


def test_wrong_key_rejected_with_reason_and_counted() -> None:
    stats = AuthStats()
    client, server = pair(client_key=b"\x01" * 32, stats=stats)
    with pytest.raises(RemoteProtocolError, match="impostor|wrong"):
        run(client, server)
    # The client detects the server's proof mismatch first (it cannot prove our key).
    assert client.state is not State.READY and server.state is not State.READY


def test_unknown_entity_rejected() -> None:
    stats = AuthStats()
    client, server = pair(name="client.nobody", stats=stats)
    with pytest.raises(RemoteProtocolError, match="unknown entity"):
        run(client, server)
    assert stats.counts == {"unknown_entity": 1}


def test_replayed_challenge_rejected() -> None:
    """A recorded AUTH_REQUEST replayed on a new connection is refused."""
    stats = AuthStats()
    seen: OrderedDict = OrderedDict()
    c, s = configs(stats=stats, seen=seen)
    client = Connection(Role.CLIENT, c, Session(Policy.lossless_client()),
                        target_addr=EntityAddr(0, "127.0.0.1", 6800))
    recorded: list[bytes] = []

    def record(data: bytes, c2s: bool) -> bytes:
        if c2s:
            recorded.append(data)
        return data

    run(client, Connection(Role.SERVER, s), tamper=record)
    replay = Connection(Role.SERVER, s)
    with pytest.raises(RemoteProtocolError, match="replayed"):
        for chunk in recorded[:2]:
            replay.receive_data(chunk)
            while replay.next_event() is not NEED_DATA:
                pass
    assert stats.counts.get("replay") == 1


def test_every_tampered_byte_of_a_secure_frame_faults() -> None:
    client, server = pair(mode=MODE_SECURE)
    run(client, server)
    assert client.session is not None
    exported = server._export_stream()  # the server's secure state before the frame
    client.session.queue(Message(1, "payload"))
    client.write_messages()
    wire = b"".join(bytes(b) for b in client.data_to_send())
    _, scfg = configs(mode=MODE_SECURE)
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x20
        victim = Connection(Role.SERVER, scfg)
        victim.state = State.READY
        victim.session = Session(Policy.stateful_server())
        victim._import_stream(exported)
        victim.receive_data(bytes(bad))
        if i < 4:
            # A corrupted length only makes the receiver wait for more bytes: nothing is
            # delivered now, and the tag check fails on whatever arrives next.
            try:
                assert victim.next_event() is NEED_DATA
            except RemoteProtocolError:
                pass
            continue
        with pytest.raises(RemoteProtocolError):
            while victim.next_event() is not NEED_DATA:
                pass
    # ...and the untampered record is accepted by the same state.
    ok = Connection(Role.SERVER, scfg)
    ok.state = State.READY
    ok.session = Session(Policy.stateful_server())
    ok._import_stream(exported)
    ok.receive_data(wire)
    assert isinstance(ok.next_event(), MessageReceived)


def test_transcript_tampering_detected_by_signature() -> None:
    """Flip a bit in the server's HELLO (address field, no crc error possible after we
    recompute the frame? no: crc protects it) -> instead drop feature bits in the banner."""
    client, server = pair()

    def tamper(data: bytes, c2s: bool) -> bytes:
        if not c2s and data.startswith(b"ceph v2\n"):
            b = bytearray(data)
            b[10] ^= 0x02  # flip an unused supported-feature bit in the server banner
            return bytes(b)
        return data

    with pytest.raises(RemoteProtocolError, match="AUTH_SIGNATURE"):
        run(client, server, tamper=tamper)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_signature_covers_raw_bytes_received_through_get_buffer(chunk: int) -> None:
    """AUTH_SIGNATURE is HMAC over the raw bytes received before auth ended. Feed them
    through the zero-copy path (get_buffer/buffer_updated) in odd chunks, with bytes that
    follow the last auth frame in the same read: both sides must still agree."""
    client, server = pair()
    for _ in range(30):
        moved = False
        for src, dst in ((client, server), (server, client)):
            data = b"".join(bytes(b) for b in src.data_to_send())
            moved = moved or bool(data)
            for i in range(0, len(data), chunk):
                piece = data[i:i + chunk]
                view = dst.get_buffer(len(piece))
                n = min(len(view), len(piece))
                view[:n] = piece[:n]
                dst.buffer_updated(n)
                if n < len(piece):
                    dst.receive_data(piece[n:])
            while (ev := dst.next_event()) is not NEED_DATA:
                if isinstance(ev, IdentRequest):
                    dst.accept_new_session(Session(Policy.stateful_server()), 77)
        if not moved:
            break
    assert client.is_ready and server.is_ready
    assert not client.transcript.recording and not server.transcript.recording


def test_transcript_cut_at_the_last_consumed_byte() -> None:
    t = Transcript(True)
    t.sent([b"ab", memoryview(b"cd")])
    t.received(b"0123456789")
    assert t.finish_received(3) == b"0123456"
    t.received(b"after auth")  # not logged: auth has ended
    t.sent([b"ef"])  # the sent side is kept until the peer's signature is checked
    assert t.finish_received(0) == b"" and t.sent_bytes() == b"abcdef"
    t.stop()
    assert t.sent_bytes() == b"" and not t.recording
    off = Transcript(False)
    off.received(b"x")
    off.sent([b"y"])
    assert off.finish_received(0) == b"" and off.sent_bytes() == b""
