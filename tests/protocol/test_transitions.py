"""The handshake tables are what the code does: every row walked with real frames.

A client and a server :class:`Connection` talk sans-I/O; their bytes are moved one frame
at a time, and each frame's (role, state before, tag, state after) is checked against
:data:`protocol.transitions.TRANSITIONS`. The scenarios together must reach every next
state of every row (and every refusing row), so a row the code overrides, or one the
code never takes, fails here.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
import struct
from typing import Any

import pytest

from protocol.auth import (
    AuthResult, AuthStats, NoneClientAuth, NoneServerAuth, RefuseServerAuth, SecretClientAuth,
    SecretServerAuth,
)
from protocol.ceph import features as ceph_feat
from protocol.connection import NEED_DATA, Config, Connection, IdentRequest, ReconnectRequest
from protocol.control import (
    MODE_CRC, AuthRequest, EntityAddr, Hello, ServerIdent, encode_control,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.frames import BANNER_SIZE, EPILOGUE_SIZE, PREAMBLE_SIZE, Tag
from protocol.message import Message
from protocol.policy import Policy
from protocol.session import Session
from protocol.transitions import (
    FAULTS, LOCAL_TRANSITIONS, TRANSITIONS, Local, Role, State,
)

SERVER_ADDR = EntityAddr(7, "127.0.0.1", 6800)
CLIENT_ADDR = EntityAddr(9, "", 0)
_LENS = struct.Struct("<BBIHIHIHIH")

Step = tuple[Role, State, int, State, bool]  # role, before, tag, after, refused


def split_frames(data: bytes) -> list[tuple[int | None, bytes]]:
    """(tag, bytes) per frame of a crc-mode stream; tag None for a banner."""
    out: list[tuple[int | None, bytes]] = []
    pos = 0
    if data.startswith(b"ceph v2\n"):
        out.append((None, data[:BANNER_SIZE]))
        pos = BANNER_SIZE
    while pos < len(data):
        tag, nseg, l0, _a0, l1, _a1, l2, _a2, l3, _a3 = _LENS.unpack_from(data, pos)
        size = PREAMBLE_SIZE + l0 + (4 if l0 else 0) + l1 + l2 + l3
        size += EPILOGUE_SIZE if nseg > 1 else 0
        out.append((tag, data[pos:pos + size]))
        pos += size
    assert pos == len(data)
    return out


def cfg(entity: int, addr: EntityAddr, **kw: Any) -> Config:
    cookies = itertools.count(100)
    return Config(entity_type=entity, my_addr=addr, new_cookie=lambda: next(cookies), **kw)


class Walk:
    """A client and a server; ``decide`` answers the server's session requests."""

    def __init__(self, client_session: Session, ccfg: Config, scfg: Config,
                 decide: Any = None) -> None:
        self.client = Connection(Role.CLIENT, ccfg, client_session,
                                 target_addr=EntityAddr(0, "127.0.0.1", 6800))
        self.server = Connection(Role.SERVER, scfg)
        self.decide = decide or (lambda conn, ev: conn.accept_new_session(
            Session(Policy.stateful_server()), 500))
        self.steps: list[Step] = []
        self.events: list[Any] = []

    def run(self) -> list[Step]:
        """Move frames one at a time both ways until nothing moves."""
        for _ in range(60):
            moved = False
            for src, dst in ((self.client, self.server), (self.server, self.client)):
                src.write_messages()
                data = b"".join(bytes(b) for b in src.data_to_send())
                for tag, chunk in split_frames(data):
                    moved = True
                    self._feed(dst, tag, chunk)
            if not moved:
                return self.steps
        raise AssertionError("the walk did not settle")

    def _feed(self, dst: Connection, tag: int | None, chunk: bytes) -> None:
        before = dst.state
        dst.receive_data(chunk)
        refused = False
        after: State | None = None  # the frame's own transition, before the owner decides
        try:
            while (ev := dst.next_event()) is not NEED_DATA:
                self.events.append(ev)
                if isinstance(ev, (IdentRequest, ReconnectRequest)):
                    after = after or dst.state
                    self.decide(dst, ev)
        except RemoteProtocolError:
            refused = True
        if tag is not None and not (before is State.READY and tag == Tag.MESSAGE):
            self.steps.append((dst.role, before, tag, after or dst.state, refused))


def _fresh(**kw: Any) -> Walk:
    return Walk(Session(Policy.lossless_client()), cfg(8, CLIENT_ADDR, **kw.pop("c", {})),
                cfg(4, SERVER_ADDR, **kw.pop("s", {})), **kw)


def _ready_traffic(w: Walk) -> None:
    """Messages, standalone ACKs and keepalives both ways once READY."""
    w.run()
    assert w.client.is_ready and w.server.is_ready
    assert w.client.session is not None and w.server.session is not None
    w.client.session.queue(Message(1, "ping"))
    w.run()
    w.server.session.queue(Message(1, "pong"))
    w.client.send_keepalive((1, 2))
    w.server.send_keepalive((3, 4))
    w.run()


def _reconnect(verdicts: list[str]) -> Walk:
    """A second connection of a session the server knows; the server answers each
    SESSION_RECONNECT with the next verdict, then accepts (or new-session on ident)."""
    session = Session(Policy.lossless_client())
    first = Walk(session, cfg(8, CLIENT_ADDR), cfg(4, SERVER_ADDR))
    first.run()
    server_session = first.server.session
    assert server_session is not None and session.server_cookie
    session.requeue_sent()
    left = list(verdicts)

    def decide(conn: Connection, ev: Any) -> None:
        if left:
            verdict = left.pop(0)
            conn.reject(verdict, full=True, value=session.connect_seq + 5)
        elif isinstance(ev, ReconnectRequest):
            conn.accept_reconnect(server_session)
        else:
            conn.accept_new_session(Session(Policy.stateful_server()), 600)

    w = Walk(session, cfg(8, CLIENT_ADDR), cfg(4, SERVER_ADDR), decide)
    w.run()
    return w


class _RoundsServerAuth(NoneServerAuth):
    """An auth method that asks for two more rounds before it is done."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0

    def handle_request(self, method: int, modes: tuple[int, ...], payload: bytes
                       ) -> tuple[str, object]:
        return ("more", b"round 1")

    def handle_more(self, payload: bytes) -> tuple[str, object]:
        self.rounds += 1
        if self.rounds < 2:
            return ("more", b"round 2")
        return ("done", AuthResult(1, MODE_CRC, None))


class _RoundsClientAuth(NoneClientAuth):
    def more(self, payload: bytes) -> bytes:
        return b"answer to " + payload


def _scenarios() -> dict[str, Walk]:
    out: dict[str, Walk] = {}
    out["fresh"] = w = _fresh()
    _ready_traffic(w)
    stats = AuthStats()
    out["secret"] = w = _fresh(
        c={"client_auth": lambda: SecretClientAuth("client.a", bytes(32), (MODE_CRC,))},
        s={"server_auth": lambda: SecretServerAuth({"client.a": bytes(32)}, MODE_CRC, stats,
                                                   OrderedDict())})
    w.run()
    out["rounds"] = w = _fresh(c={"client_auth": _RoundsClientAuth},
                               s={"server_auth": _RoundsServerAuth})
    w.run()
    out["refused"] = w = _fresh(s={"server_auth": lambda: RefuseServerAuth("full")})
    w.run()
    missing = next(1 << i for i in range(64) if not ceph_feat.SUPPORTED >> i & 1)
    out["missing"] = w = _fresh(s={"ceph_features_required": ceph_feat.REQUIRED | missing})
    w.run()
    out["wait"] = w = _fresh(decide=lambda conn, ev: conn.reject("wait"))
    w.run()
    out["resume"] = _reconnect([])
    out["reset"] = _reconnect(["reset"])
    out["retry"] = _reconnect(["retry", "retry_global"])
    out["wait_reconnecting"] = _reconnect(["wait"])
    return out


def test_every_row_of_the_handshake_table_is_walked_and_obeyed() -> None:
    reached: set[tuple[tuple[Role, State, int], State | None]] = set()
    for name, walk in _scenarios().items():
        for role, before, tag, after, refused in walk.steps:
            key = (role, before, tag)
            assert key in TRANSITIONS, f"{name}: {key} has no row (refused: {refused})"
            _handler, then = TRANSITIONS[key]
            if refused:
                assert after is State.CLOSED, f"{name}: a refused {key} left {after}"
                reached.add((key, None))
            else:
                assert then is not FAULTS, f"{name}: {key} should always refuse"
                assert after in then.values(), f"{name}: {key} went to {after}, table says {then}"
                reached.add((key, after))
    expected = {(key, nxt) for key, (_h, then) in TRANSITIONS.items() for nxt in then.values()}
    expected |= {(key, None) for key, (_h, then) in TRANSITIONS.items() if then is FAULTS}
    # Refusals of rows with outcomes (a bad signature, a refused auth method) are also
    # reached; only the table's own states must all be.
    assert expected - reached == set(), "rows (or outcomes) no scenario reaches"


def test_the_tables_name_real_handlers_and_no_message_rows() -> None:
    for (_role, _state, tag), (handler, then) in TRANSITIONS.items():
        assert callable(getattr(Connection, handler)), handler
        assert tag != Tag.MESSAGE  # READY's fast path takes MESSAGE frames, never the table
    # every state a row or a local trigger leads to exists, and CLOSE works from anywhere
    assert all((r, s, Local.CLOSE) in LOCAL_TRANSITIONS for r in Role for s in State)


def _ready_pair() -> Walk:
    w = _fresh()
    w.run()
    assert w.client.is_ready and w.server.is_ready
    return w


@pytest.mark.parametrize("side,frame,state", [
    ("server", encode_control(Hello(8, CLIENT_ADDR)), "ready"),
    ("client", encode_control(ServerIdent((SERVER_ADDR,), 0, 1, 0, 0, 0, 1)), "ready"),
    ("client", encode_control(AuthRequest(1, (MODE_CRC,), b"")), "ready"),
])
def test_a_frame_with_no_row_faults_the_connection(side: str, frame: list[Any],
                                                   state: str) -> None:
    w = _ready_pair()
    conn = w.server if side == "server" else w.client
    tag = Tag(frame[0][0]).name
    conn.receive_data(b"".join(bytes(b) for b in frame))
    with pytest.raises(RemoteProtocolError,
                       match=rf"unexpected {tag} frame in state {state} \({side}\)") as err:
        conn.next_event()
    assert err.value.code == "bad_tag"
    assert conn.state is State.CLOSED
    assert conn.next_event() is NEED_DATA  # nothing more is read from a faulted exchange


def test_a_frame_before_its_state_faults_the_handshake() -> None:
    server = Connection(Role.SERVER, cfg(4, SERVER_ADDR))
    client = Connection(Role.CLIENT, cfg(8, CLIENT_ADDR), Session(Policy.lossless_client()))
    banner = b"".join(bytes(b) for b in client.data_to_send())
    # AUTH_REQUEST where HELLO must come: no row for (server, hello, AUTH_REQUEST)
    server.receive_data(banner + b"".join(
        bytes(b) for b in encode_control(AuthRequest(1, (MODE_CRC,), b""))))
    with pytest.raises(RemoteProtocolError,
                       match=r"unexpected AUTH_REQUEST frame in state hello \(server\)"):
        server.next_event()
    assert server.state is State.CLOSED


def test_local_transitions_follow_their_table() -> None:
    w = _ready_pair()
    stream = w.server.export_ready()
    assert w.server.state is State.CLOSED
    w.server.restore_ready(stream)
    assert w.server.state is State.READY
    with pytest.raises(LocalProtocolError, match="restore_ready is not allowed in state ready"):
        w.server.restore_ready(stream)
    assert w.server.session is not None
    moved = Connection.import_ready(Role.SERVER, w.server.config, w.server.session,
                                    w.server.peer_type, w.server.peer_addrs,
                                    w.server.export_ready())
    assert moved.state is State.READY and not moved.has_data_to_send()
    moved.close()
    assert moved.state is State.CLOSED
    fresh = Connection(Role.SERVER, cfg(4, SERVER_ADDR))
    with pytest.raises(LocalProtocolError, match="cannot reject in state banner"):
        fresh.reject("reset")
    fresh.close()
    assert fresh.state is State.CLOSED
