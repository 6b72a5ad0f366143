"""Policies as data (Ceph Policy.h factory table) and reconnect backoff."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from protocol.errors import LocalProtocolError
from protocol.features import SUPPORTED
from protocol.policy import POLICIES, Backoff, Policy

# name: (lossy, server, standby, resetcheck, register_lossy_clients) — notes §2.1.
TABLE = {
    "stateful_server": (False, True, True, True, True),
    "stateless_registered_server": (True, True, False, False, True),
    "stateless_server": (True, True, False, False, False),
    "lossless_peer": (False, False, True, False, True),
    "lossless_peer_reuse": (False, False, True, True, True),
    "lossy_client": (True, False, False, False, True),
    "lossless_client": (False, False, False, True, True),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_factory_table(name: str) -> None:
    p = POLICIES[name]()
    assert (p.lossy, p.server, p.standby, p.resetcheck, p.register_lossy_clients) == TABLE[name]
    assert p == getattr(Policy, name)()
    assert (p.throttle_messages, p.throttle_bytes) == (0, 0)
    assert (p.features_supported, p.features_required) == (SUPPORTED, 0)


def test_registry_is_exactly_the_table() -> None:
    assert set(POLICIES) == set(TABLE)


def test_with_throttles_copies() -> None:
    base = Policy.lossless_client()
    t = base.with_throttles(100, 1 << 20)
    assert (t.throttle_messages, t.throttle_bytes) == (100, 1 << 20)
    assert (base.throttle_messages, base.throttle_bytes) == (0, 0)
    assert dataclasses.replace(t, throttle_messages=0, throttle_bytes=0) == base
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.lossy = True  # type: ignore[misc]


@pytest.mark.parametrize("kwargs", [{"throttle_messages": -1}, {"throttle_bytes": 1.5},
                                    {"features_required": 2, "features_supported": 1}])
def test_policy_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(Policy.lossy_client(), **kwargs)


def test_backoff_doubles_to_cap() -> None:
    b = Backoff()
    delays = [b.next(0)]
    for _ in range(10):
        delays.append(b.next(delays[-1]))
    assert delays[:4] == [0.2, 0.4, 0.8, 1.6]
    assert delays[-1] == 15.0 and max(delays) == 15.0
    assert Backoff(0.5, 1.0).next(0.75) == 1.0


@pytest.mark.parametrize("args", [(0, 1), (2, 1), (-1, 5)])
def test_backoff_validated(args: tuple[float, float]) -> None:
    with pytest.raises(LocalProtocolError):
        Backoff(*args)
