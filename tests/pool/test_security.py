"""Auth and secure mode over real sockets, and the keyring file rules."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool.api import EntityType, EventCenter, Message, Messenger, Policy
from pool.apps import EchoDispatcher
from pool.api import AuthSettings, KeyringError, load_keyring, write_keyring
from tools.stress.echo import StressConfig, run_stress
from tests.pool.test_messenger import FailureRecorder, Harness, Recorder

KEYS = {"client.admin": os.urandom(32), "osd.0": os.urandom(32)}


@pytest.fixture
def keyring(tmp_path: Path) -> str:
    path = str(tmp_path / "keyring.toml")
    write_keyring(path, KEYS)
    return path


def test_keyring_mode_is_enforced(keyring: str) -> None:
    assert load_keyring(keyring) == KEYS
    os.chmod(keyring, 0o644)
    with pytest.raises(KeyringError, match="chmod 600"):
        load_keyring(keyring)


def test_keyring_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[keys]\n"a" = "not base64!"\n')
    os.chmod(bad, 0o600)
    with pytest.raises(KeyringError, match="not valid base64"):
        load_keyring(str(bad))
    with pytest.raises(KeyringError, match="does not exist"):
        load_keyring(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="secure mode needs --auth secret"):
        AuthSettings("none", "secure")


@pytest.fixture
def center() -> Iterator[EventCenter]:
    c = EventCenter()
    yield c
    c.close()


@pytest.mark.parametrize("mode", ["crc", "secure"])
def test_secret_auth_sessions_survive_faults(center: EventCenter, keyring: str, mode: str) -> None:
    h = Harness(center)
    try:
        ring = load_keyring(keyring)
        sd, cd = Recorder(echo=True), Recorder()
        srv = h.messenger(EntityType.OSD, Policy.stateful_server(), sd, bind=True,
                          auth=AuthSettings("secret", mode, "osd.0", ring),
                          inject_socket_failures=40)
        cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), cd,
                          auth=AuthSettings("secret", mode, "client.admin", ring),
                          inject_socket_failures=40)
        conn = cli.connect(srv.listeners[0].address)
        for batch in range(60):  # small batches: many socket I/Os for the injector
            for i in range(batch * 5, batch * 5 + 5):
                conn.send_message(Message(1, i, data=os.urandom(100)))
            h.wait_for(lambda b=batch: cd.total() == b * 5 + 5, timeout=30)
        assert cd.received[conn] == list(range(300))
        h.wait_for(conn.is_connected)
        assert conn.wire is not None and conn.wire.secure == (mode == "secure")
        assert srv.stats["injected_failures"] + cli.stats["injected_failures"] > 0
    finally:
        h.close()


def test_wrong_key_gets_no_session_and_is_counted(center: EventCenter, keyring: str) -> None:
    h = Harness(center)
    try:
        ring = load_keyring(keyring)
        sd = Recorder(echo=True)
        srv = h.messenger(EntityType.OSD, Policy.stateful_server(), sd, bind=True,
                          auth=AuthSettings("secret", "crc", "osd.0", ring))
        forged = {"client.admin": os.urandom(32)}
        cd = FailureRecorder()
        cli = h.messenger(EntityType.CLIENT, Policy.lossless_client(), cd,
                          auth=AuthSettings("secret", "crc", "client.admin", forged))
        conn = cli.connect(srv.listeners[0].address)
        conn.send_message(Message(1, "let me in"))
        h.wait_for(lambda: cli.stats["protocol_error_auth"] >= 1)
        assert sd.total() == 0 and sd.accepts == 0
        assert not conn.is_connected()
        # Retrying cannot fix a wrong key: the app is told why, and retries slow down.
        h.wait_for(lambda: bool(cd.failures))
        assert cd.failures[0].code == "auth"
        assert "wrong keyring" in cd.failures[0].reason or "rejected" in cd.failures[0].reason
        assert conn.backoff == cli.backoff.maximum
        # An unauthenticated client (auth none) is refused too, and counted by reason.
        anon = h.messenger(EntityType.CLIENT, Policy.lossless_client(), Recorder())
        anon.connect(srv.listeners[0].address).send_message(Message(1, "hi"))
        h.wait_for(lambda: srv.auth.stats.counts.get("bad_method", 0) >= 1)
        assert sd.total() == 0
    finally:
        h.close()


def test_stress_tool_in_secure_mode(center: EventCenter, keyring: str) -> None:
    ring = load_keyring(keyring)
    srv = Messenger(center, entity_type=EntityType.OSD, policy=Policy.stateful_server(),
                    auth=AuthSettings("secret", "secure", "osd.0", ring))
    srv.add_dispatcher(EchoDispatcher())
    addr = srv.bind(("127.0.0.1", 0))
    import threading
    stop = threading.Event()
    t = threading.Thread(target=lambda: [center.process_events(0.05) for _ in iter(stop.is_set, True)],
                         daemon=True)
    t.start()
    try:
        r = run_stress(StressConfig(target=addr, conns=4, messages=2000, seed=5,
                                    auth=AuthSettings("secret", "secure", "client.admin", ring)))
    finally:
        stop.set()
        t.join(10)
        srv.shutdown()
        center.process_events(0)
    assert r.ok and r.received == 2000, r
