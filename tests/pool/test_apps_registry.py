"""The app registry and the handoff state check (no processes: what they return/refuse)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from pool.apps import APPS, EchoDispatcher, MessengerApp, load_app
from pool.apps.kv import KvApp
from pool.apps.migration import MAX_META, _decode_meta, cookie_owner, cookie_tag
from pool.api import Dispatcher


class Quiet(Dispatcher):
    pass


def test_builtin_and_module_apps() -> None:
    assert set(APPS) == {"echo", "kv"}
    echo = load_app("echo", {"seed": 1})()
    assert isinstance(echo, MessengerApp) and echo.dispatcher_factory is EchoDispatcher
    kv = load_app("kv", {"move_timeout": 2})()
    assert isinstance(kv, KvApp) and kv.move_timeout == 2.0
    # KvApp composes a MessengerApp and is its dispatcher; it does not inherit it.
    assert not isinstance(kv, MessengerApp) and kv.msgr_app.dispatcher_factory() is kv
    app = load_app(f"{__name__}:Quiet")()
    assert isinstance(app, MessengerApp) and isinstance(app.dispatcher_factory(), Quiet)
    with pytest.raises(ValueError, match="MODULE:NAME"):
        load_app("no-such-app")


def test_cookie_names_its_owner() -> None:
    assert cookie_owner(cookie_tag(5, 0x1_0003) << 40 | 12345) == (5, 3)
    assert cookie_owner(12345) is None


def _session_meta(**over: Any) -> dict[str, Any]:
    meta = {"kind": 2, "key": "client.1", "peer_type": 8, "peer_addrs": [b"\x01"],
            "session": {}, "stream": {}, "standby": False, "idle": 0.5}
    meta.update(over)
    return meta


@pytest.mark.parametrize("meta", [
    b"\xc1",                                         # not msgpack
    msgpack.packb([1, 2]),                           # not a map
    msgpack.packb({"kind": 3}),                      # unknown kind
    msgpack.packb({"kind": 1, "handshake": b"x"}),
    msgpack.packb(_session_meta(key=5)),
    msgpack.packb(_session_meta(peer_type="8")),
    msgpack.packb(_session_meta(peer_addrs=[b"x"] * 17)),
    msgpack.packb(_session_meta(standby=1)),
    msgpack.packb(_session_meta(idle=-1.0)),
    msgpack.packb({k: v for k, v in _session_meta().items() if k != "stream"}),
    b"\x90" * (MAX_META + 1),
], ids=["junk", "list", "kind", "handshake", "key", "peer_type", "addrs", "standby", "idle",
        "missing", "oversize"])
def test_handoff_state_is_checked(meta: bytes) -> None:
    assert _decode_meta(msgpack.packb(_session_meta()))["key"] == "client.1"
    with pytest.raises(ValueError):
        _decode_meta(meta)
