"""Connection policies as data (Ceph's ``Policy.h``) and the reconnect backoff.

Flags: ``lossy`` drop everything on fault and report a reset; ``server`` never initiate
a reconnect; ``standby`` go idle on fault when nothing is queued; ``resetcheck`` detect
peer restarts and discard session state; ``register_lossy_clients`` register lossy
clients in the session registry (else they are anonymous).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .errors import LocalProtocolError
from .features import REQUIRED, SUPPORTED

__all__ = ["POLICIES", "Backoff", "Policy"]


@dataclass(frozen=True, slots=True)
class Policy:
    """Per-peer-type connection behaviour. Throttle limits of 0 mean unlimited."""

    lossy: bool
    server: bool
    standby: bool
    resetcheck: bool
    register_lossy_clients: bool = True
    throttle_messages: int = 0
    throttle_bytes: int = 0
    features_supported: int = SUPPORTED
    features_required: int = REQUIRED

    def __post_init__(self) -> None:
        for name in ("throttle_messages", "throttle_bytes", "features_supported",
                     "features_required"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise LocalProtocolError(f"Policy.{name} must be an int >= 0, got {value!r}",
                                         "bad_policy")
        if self.features_required & ~self.features_supported:
            raise LocalProtocolError("Policy requires features it does not support",
                                     "bad_policy")

    # Factories: flags exactly per Ceph's Policy.h (notes §2.1), in constructor order
    # lossy, server, standby, resetcheck, register_lossy_clients.
    @classmethod
    def stateful_server(cls) -> Policy:
        return cls(False, True, True, True, True)

    @classmethod
    def stateless_registered_server(cls) -> Policy:
        return cls(True, True, False, False, True)

    @classmethod
    def stateless_server(cls) -> Policy:
        return cls(True, True, False, False, False)

    @classmethod
    def lossless_peer(cls) -> Policy:
        return cls(False, False, True, False, True)

    @classmethod
    def lossless_peer_reuse(cls) -> Policy:
        return cls(False, False, True, True, True)

    @classmethod
    def lossy_client(cls) -> Policy:
        return cls(True, False, False, False, True)

    @classmethod
    def lossless_client(cls) -> Policy:
        return cls(False, False, False, True, True)

    def with_throttles(self, messages: int, bytes_: int) -> Policy:
        """A copy with receive throttles (message count, bytes); 0 = unlimited."""
        return replace(self, throttle_messages=messages, throttle_bytes=bytes_)


POLICIES: dict[str, Callable[[], Policy]] = {
    "stateful_server": Policy.stateful_server,
    "stateless_registered_server": Policy.stateless_registered_server,
    "stateless_server": Policy.stateless_server,
    "lossless_peer": Policy.lossless_peer,
    "lossless_peer_reuse": Policy.lossless_peer_reuse,
    "lossy_client": Policy.lossy_client,
    "lossless_client": Policy.lossless_client,
}


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays (seconds): ``initial`` after the first failure, doubling to ``maximum``.

    Ceph: ``ms_initial_backoff`` 0.2 s, ``ms_max_backoff`` 15 s; WAIT jumps to the maximum.
    """

    initial: float = 0.2
    maximum: float = 15.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise LocalProtocolError(
                f"Backoff needs 0 < initial <= maximum, got {self.initial}, {self.maximum}",
                "bad_backoff")

    def next(self, current: float) -> float:
        """The delay after ``current``: 0 (no backoff yet) -> initial, then doubled, capped."""
        if current <= 0:
            return self.initial
        return min(current * 2, self.maximum)
