"""The admin protocol: framing, errors that explain themselves, and robustness."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pool.supervisor.admin import (
    MAX_REQUEST,
    AdminClient,
    AdminError,
    AdminServer,
    default_admin_path,
)
from transport.event_center import EventCenter


class ServerThread:
    """An AdminServer on its own EventCenter, owned by one thread (the center's rule)."""

    def __init__(self, path: str, handlers: dict[str, Any]) -> None:
        self.path = path
        self.handlers = handlers
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)
        if self.error:
            raise self.error

    def _run(self) -> None:
        center = EventCenter(name="admin-test")
        try:
            server = AdminServer(center, self.path, self.handlers)
        except BaseException as exc:
            self.error = exc
            center.close()
            self.ready.set()
            return
        self.ready.set()
        while not self.stop.is_set():
            center.process_events(0.02)
        server.close()
        center.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def boom(_args: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("handler bug")


def scale(args: dict[str, Any]) -> dict[str, Any]:
    n = args["n"]
    if not isinstance(n, int):
        raise ValueError("n must be an integer")
    return {"desired": n}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    st = ServerThread(str(tmp_path / "a.sock"), {"status": lambda a: {"workers": []},
                                                 "scale": scale, "boom": boom})
    yield st
    st.close()
    assert not os.path.exists(st.path), "the socket file must be removed on close"


def frame(obj: Any) -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack("!I", len(body)) + body


def test_status_roundtrip(server: ServerThread) -> None:
    assert AdminClient(server.path).call("status") == {"ok": True, "workers": []}
    assert AdminClient(server.path).call("scale", n=3)["desired"] == 3


@pytest.mark.parametrize("raw,needle", [
    (frame(b"{not json"), "not valid JSON"),
    (frame(b"\xff\xfe"), "not valid JSON"),
    (frame([1, 2]), "JSON object with a string \"cmd\""),
    (frame({"cmd": 5}), "string \"cmd\""),
    (frame({"cmd": "nope"}), "unknown command 'nope'; commands: boom, scale, status"),
    (frame({"cmd": "scale"}), "scale: 'n'"),
    (frame({"cmd": "scale", "n": "x"}), "n must be an integer"),
    (frame({"cmd": "boom"}), "failed inside the supervisor"),
])
def test_bad_requests_get_an_explaining_error(server: ServerThread, raw: bytes, needle: str) -> None:
    reply = AdminClient(server.path).raw(raw, check=False)
    assert reply["ok"] is False and needle in reply["error"]
    assert AdminClient(server.path).call("status")["ok"]  # the server is still fine


def test_error_reply_raises_admin_error(server: ServerThread) -> None:
    with pytest.raises(AdminError, match="unknown command"):
        AdminClient(server.path).call("frobnicate")


def test_oversized_request_is_refused_before_reading_it(server: ServerThread) -> None:
    big = b"x" * (MAX_REQUEST + 1)
    reply = AdminClient(server.path).raw(struct.pack("!I", len(big)) + big, check=False)
    assert reply["ok"] is False and "exceeds the 65536-byte limit" in reply["error"]
    # A claimed 4 GiB frame is refused from its header alone.
    reply = AdminClient(server.path).raw(b"\xff\xff\xff\xff", check=False)
    assert "exceeds" in reply["error"]
    assert AdminClient(server.path).call("status")["ok"]


def test_truncated_request_and_abrupt_clients(server: ServerThread) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(server.path)
    s.sendall(struct.pack("!I", 100) + b"{\"cmd\"")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    assert b"request truncated" in data
    for _ in range(20):  # connect-and-vanish, mid-frame resets
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(server.path)
        c.sendall(b"\x00\x00")
        c.close()
    assert AdminClient(server.path).call("status")["ok"]


def test_pipelined_requests_on_one_connection(server: ServerThread) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(server.path)
    s.sendall(frame({"cmd": "scale", "n": 1}) + frame({"cmd": "scale", "n": 2}))
    got = []
    buf = b""
    while len(got) < 2:
        buf += s.recv(4096)
        while len(buf) >= 4 and len(buf) >= 4 + struct.unpack_from("!I", buf)[0]:
            n = struct.unpack_from("!I", buf)[0]
            got.append(json.loads(buf[4:4 + n]))
            buf = buf[4 + n:]
    s.close()
    assert [g["desired"] for g in got] == [1, 2]


def test_no_pool_and_stale_socket_files(tmp_path: Path) -> None:
    path = str(tmp_path / "gone.sock")
    with pytest.raises(AdminError, match="no pool is serving"):
        AdminClient(path).call("status")
    # A socket file left by a SIGKILLed pool is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    st = ServerThread(path, {"status": lambda a: {}})
    try:
        assert AdminClient(path).call("status")["ok"]
        # ...but a live one is not taken over.
        with pytest.raises(AdminError, match="already serving"):
            ServerThread(path, {})
    finally:
        st.close()


def test_refuses_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(AdminError, match="too long"):
        ServerThread(str(tmp_path / ("x" * 120)), {})
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(AdminError, match="not a socket"):
        ServerThread(str(plain), {})


def test_default_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    assert default_admin_path() == "/run/user/7/asyncmsgr/admin.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_admin_path() == f"/tmp/asyncmsgr-{os.getuid()}/admin.sock"
