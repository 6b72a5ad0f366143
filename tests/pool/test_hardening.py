"""Hostile and careless peers: connection cap, slowloris, clients that never read,
dispatchers that never release. The server runs in its own process so its RSS can be
measured from /proc."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pool.api import (
    AsyncConnection, Dispatcher, EntityType, EventCenter, Message, Messenger, Policy,
)
from pool.apps import EchoDispatcher
from protocol.connection import NEED_DATA, Config, Connection, Role
from protocol.control import EntityAddr
from protocol.session import Session
from tests.pool.test_messenger import Harness, Recorder

pytestmark = pytest.mark.slow


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


_SERVER = """
import json, signal, sys
from pool.api import Dispatcher, EntityType, EventCenter, Messenger, MessengerConfig, Policy
from pool.apps import EchoDispatcher
kind, kw = sys.argv[1], json.loads(sys.argv[2])
center = EventCenter()
m = Messenger(center, MessengerConfig(**kw), entity_type=EntityType.OSD,
              policy=Policy.stateful_server())
if kind == "echo":
    m.add_dispatcher(EchoDispatcher())
else:
    kept = []
    class Holder(Dispatcher):
        def ms_dispatch(self, conn, msg):
            kept.append((msg, m.hold(msg)))  # never released
    m.add_dispatcher(Holder())
addr = m.bind(("127.0.0.1", 0))
print(addr[1], flush=True)
signal.signal(signal.SIGTERM, lambda *_: center.stop())
center.run()
"""


def _serve_forked(kind: str, **kw: Any) -> tuple[int, tuple[str, int]]:
    """Start a server in a fresh interpreter (not a fork of this big test process, whose
    copy-on-write pages would show up as RSS growth); return (pid, address)."""
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, kind, json.dumps(kw)],
                            stdout=subprocess.PIPE, cwd=str(Path(__file__).parents[2]))
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    _PROCS[proc.pid] = proc
    return proc.pid, ("127.0.0.1", port)


_PROCS: dict[int, subprocess.Popen[bytes]] = {}


def _stop(pid: int) -> None:
    proc = _PROCS.pop(pid)
    proc.terminate()
    proc.wait(timeout=30)
    if proc.stdout is not None:
        proc.stdout.close()


def _handshake(addr: tuple[str, int]) -> tuple[socket.socket, Connection, Session]:
    """A bare msgr2 client over a blocking socket (so the test controls reading)."""
    session = Session(Policy.lossless_client())
    wire = Connection(Role.CLIENT, Config(entity_type=8, my_addr=EntityAddr(77, "", 0),
                                          new_cookie=lambda: 42),
                      session, target_addr=EntityAddr(0, addr[0], addr[1]))
    s = socket.create_connection(addr)
    deadline = time.monotonic() + 10
    while not wire.is_ready:
        assert time.monotonic() < deadline, "handshake did not finish"
        for b in wire.data_to_send():
            s.sendall(b)
        s.settimeout(1)
        wire.receive_data(s.recv(65536))
        while wire.next_event() is not NEED_DATA:
            pass
    return s, wire, session


@pytest.mark.parametrize("kind,limits", [
    ("echo", {}),                                                # replies pile up unread
    ("hold", {"throttle_messages": 64, "throttle_bytes": 8 << 20}),  # never released
])
def test_memory_stays_bounded(kind: str, limits: dict[str, int]) -> None:
    pid, addr = _serve_forked(kind, **limits)
    try:
        base = _rss_kb(pid)
        s, wire, session = _handshake(addr)
        payload = os.urandom(64 * 1024)
        s.settimeout(2.0)
        sent = 0
        # Offer up to 256 MiB; the server must stop reading long before (TCP backpressure
        # then blocks our send, which is the point).
        while sent < 256 << 20:
            for _ in range(16):
                session.queue(Message(1, None, data=payload))
            wire.write_messages()
            try:
                for b in wire.data_to_send():
                    s.sendall(b)
            except (TimeoutError, socket.timeout):
                break
            sent += 16 * len(payload)
        grown_mb = (_rss_kb(pid) - base) / 1024
        print(f"memory[{kind}]: offered {sent >> 20} MiB before push-back, "
              f"server RSS grew {grown_mb:.1f} MiB")
        s.close()
        assert sent < 256 << 20, "the server never pushed back"
        # throttle (8 MiB) / out high-water (4 MiB) + one read batch (4 MiB) + overhead
        assert grown_mb < 48, f"server RSS grew {grown_mb:.0f} MiB after {sent >> 20} MiB offered"
    finally:
        _stop(pid)


def test_connection_cap_refuses_clearly(center: EventCenter) -> None:
    h = Harness(center)
    try:
        sd = Recorder(echo=True)
        srv = h.messenger(EntityType.OSD, Policy.stateful_server(), sd, bind=True,
                          max_connections=2)
        addr = srv.listeners[0].address
        ok = []
        for i in range(2):
            cd = Recorder()
            c = h.messenger(EntityType.CLIENT, Policy.lossless_client(), cd)
            conn = c.connect(addr)
            conn.send_message(Message(1, i))
            ok.append(cd)
        h.wait_for(lambda: all(r.total() == 1 for r in ok))
        third = h.messenger(EntityType.CLIENT, Policy.lossless_client(), Recorder())
        third.connect(addr).send_message(Message(1, "over the cap"))
        h.wait_for(lambda: third.stats["protocol_error_busy"] >= 1)
        assert srv.stats["refused_busy"] >= 1
        assert len(srv.connections()) == 2
    finally:
        h.close()


@pytest.fixture
def center() -> Iterator[EventCenter]:
    c = EventCenter()
    yield c
    c.close()


def test_slowloris_half_open_connections_do_not_starve_clients() -> None:
    """500 connections that send half a banner and stall: normal clients are served
    meanwhile, and the server closes the stalled ones at its handshake timeout."""
    pid, addr = _serve_forked("echo", ready_timeout=2.0)
    stalled = []
    try:
        for _ in range(500):
            s = socket.create_connection(addr)
            s.sendall(b"ceph v")
            stalled.append(s)
        center = EventCenter()
        try:
            cd = Recorder()
            cli = Messenger(center, entity_type=EntityType.CLIENT,
                            policy=Policy.lossless_client())
            cli.add_dispatcher(cd)
            conn = cli.connect(addr)
            t0 = time.monotonic()
            for i in range(200):
                conn.send_message(Message(1, i))
            while cd.total() < 200:
                assert time.monotonic() - t0 < 10, "normal client starved"
                center.process_events(0.05)
            cli.shutdown()
            center.process_events(0)
        finally:
            center.close()
        # The stalled ones are closed by the server once the handshake timeout passes.
        deadline = time.monotonic() + 10
        closed = 0
        for s in stalled:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                if s.recv(4096) == b"" or s.recv(4096) == b"":
                    closed += 1
            except (ConnectionResetError, TimeoutError, socket.timeout):
                pass
        assert closed >= 490, f"only {closed} of 500 stalled connections were closed"
    finally:
        for s in stalled:
            s.close()
        _stop(pid)
