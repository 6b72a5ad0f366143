"""Fuzzing every decoder an untrusted peer can reach: frames, handshake (control) frames
in every state of both roles, message fronts, secure-mode records, and admin-socket
requests. The only exception allowed out of a decoder is the protocol's own
RemoteProtocolError; nothing may allocate beyond the configured caps."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples

from protocol.connection import NEED_DATA, Config, Connection, Role
from protocol.control import EntityAddr
from protocol.errors import RemoteProtocolError
from protocol.frames import FrameLimits, Tag, encode_banner, frame_bytes
from protocol.message import decode_message
from protocol.policy import Policy
from protocol.secure import SecureChannel
from protocol.session import Session

ROOT = Path(__file__).resolve().parent.parent
SMALL = FrameLimits(control_max=4096, segment_max=65536, data_max=65536)


def _drain(conn: Connection) -> None:
    for _ in range(100):
        if conn.next_event() is NEED_DATA:
            return


@settings(max_examples=examples(400), deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=3))
def test_message_decoder_only_raises_protocol_errors(segments: list[bytes]) -> None:
    try:
        decode_message([memoryview(s) for s in segments])
    except RemoteProtocolError:
        pass


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=2000))
def test_secure_records_only_raise_protocol_errors(data: bytes) -> None:
    ch = SecureChannel(b"k" * 32, client=False, max_record=70_000)
    try:
        ch.feed(data)
    except RemoteProtocolError:
        pass
    assert ch.buffered <= len(data)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(role=st.sampled_from([Role.CLIENT, Role.SERVER]), tag=st.sampled_from(list(Tag)),
       payload=st.binary(max_size=300), garbage=st.binary(max_size=300),
       prefix_frames=st.integers(0, 3))
def test_handshake_in_any_state_only_raises_protocol_errors(
        role: Role, tag: Tag, payload: bytes, garbage: bytes, prefix_frames: int) -> None:
    """A peer sends a valid banner, then well-formed frames with arbitrary tags and
    payloads (valid CRCs, so they reach the state machine), then random bytes."""
    cfg = Config(entity_type=4, my_addr=EntityAddr(1, "127.0.0.1", 6800), limits=SMALL)
    conn = Connection(role, cfg, Session(Policy.lossless_client()) if role is Role.CLIENT
                      else None, target_addr=EntityAddr(0, "127.0.0.1", 6800))
    stream = encode_banner(1, 0)
    for _ in range(prefix_frames):
        stream += frame_bytes(tag, [payload or b"\0"])
    stream += garbage
    try:
        conn.receive_data(stream)
        _drain(conn)
    except RemoteProtocolError:
        pass


def test_admin_socket_survives_garbage(tmp_path: Path) -> None:
    from pool.supervisor.admin import AdminServer
    from transport.event_center import EventCenter

    center = EventCenter()
    path = str(tmp_path / "a.sock")
    server = AdminServer(center, path, {"status": lambda req: {"ok": True, "up": True}})
    clients = []
    try:
        import random
        rng = random.Random(7)
        for i in range(300):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)
            kind = i % 4
            if kind == 0:
                c.sendall(rng.randbytes(rng.randint(1, 300)))
            elif kind == 1:  # a length prefix announcing far more than the cap
                c.sendall(struct.pack("!I", 0xFFFFFFF0) + b"{")
            elif kind == 2:  # valid frame, invalid JSON / wrong types
                body = rng.choice([b"{", b"[]", b'{"cmd": 5}', b'{"cmd": "scale", "n": "x"}',
                                   rng.randbytes(20)])
                c.sendall(struct.pack("!I", len(body)) + body)
            else:
                c.sendall(struct.pack("!I", 10))  # truncated
            clients.append(c)
            for _ in range(3):
                center.process_events(0)
        for c in clients:
            c.close()
        clients.clear()
        for _ in range(20):
            center.process_events(0)
        # ...and it still answers a well-formed request.
        ok = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        clients.append(ok)
        ok.connect(path)
        body = json.dumps({"cmd": "status"}).encode()
        ok.sendall(struct.pack("!I", len(body)) + body)
        ok.settimeout(5)
        reply = b""
        while len(reply) < 4 or len(reply) < 4 + struct.unpack("!I", reply[:4])[0]:
            center.process_events(0.05)
            try:
                reply += ok.recv(65536)
            except (BlockingIOError, socket.timeout):
                continue
        assert json.loads(reply[4:])["up"] is True
    finally:
        for c in clients:
            c.close()
        server.close()
        center.close()


_ATHERIS = textwrap.dedent('''
    import sys
    import atheris
    with atheris.instrument_imports():
        from protocol.connection import NEED_DATA, Config, Connection, Role
        from protocol.control import EntityAddr, decode_control
        from protocol.errors import RemoteProtocolError
        from protocol.frames import FrameDecoder, FrameLimits, Tag, encode_banner
        from protocol.message import decode_message
        from protocol.ceph import messages as cm
        from protocol.ceph.entity import decode_mon_auth_payload
        from protocol.ceph.header import decode_header2
    BODIES = [cm.MPing, cm.MMonGetVersion, cm.MMonGetVersionReply, cm.MMonCommand,
              cm.MMonCommandAck, cm.MMonSubscribe]
    LIMITS = FrameLimits(control_max=4096, segment_max=65536, data_max=65536)
    CFG = Config(entity_type=4, my_addr=EntityAddr(1, "127.0.0.1", 6800), limits=LIMITS)
    BANNER = encode_banner(1, 0)

    def one(data: bytes) -> None:
        if not data:
            return
        try:
            sel = data[0] % 4
            if sel == 0:
                dec = FrameDecoder(LIMITS)
                dec.feed(data[1:])
                for _ in range(50):
                    f = dec.next_frame()
                    if f is None:
                        break
                    if f.tag == Tag.MESSAGE:
                        decode_message(f.segments, asyncmsgr=bool(data[0] & 0x80))
                    else:
                        decode_control(f.tag, f.segments[0])
            elif sel == 1:
                conn = Connection(Role.SERVER, CFG)
                conn.receive_data(BANNER + data[1:])
                for _ in range(50):
                    if conn.next_event() is NEED_DATA:
                        break
            elif sel == 2:
                decode_control(int(data[1]) if len(data) > 1 else 1, memoryview(data[2:]))
            else:  # Ceph's encodings: message bodies, entity_addr_t, header2, mon auth
                k = data[1] if len(data) > 1 else 0
                body = memoryview(data[2:])
                if k < 6 * 16:
                    BODIES[k % 6].decode(body, b"", b"", version=k // 6 % 4)
                elif k < 160:
                    EntityAddr.decode(body)
                elif k < 200:
                    decode_header2(body)
                else:
                    decode_mon_auth_payload(body)
        except RemoteProtocolError:
            pass

    atheris.Setup([sys.argv[0], "-runs=" + sys.argv[1], "-max_len=4096", "-seed=1"], one)
    atheris.Fuzz()
''')


def test_atheris_coverage_guided_fuzz_of_decoders() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.skip("atheris is not installed (pip install atheris; x86-64 wheels exist)")
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "fuzz.py")
        with open(script, "w") as f:
            f.write(_ATHERIS)
        r = subprocess.run([sys.executable, script, "20000"], cwd=d, capture_output=True,
                           text=True, timeout=240, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done 20000 runs" in r.stderr
