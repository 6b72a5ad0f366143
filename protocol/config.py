"""Per-messenger parameters of a :class:`~protocol.connection.Connection`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import features as feat
from .auth import ClientAuth, NoneClientAuth, NoneServerAuth, ServerAuth
from .ceph import features as ceph_feat
from .control import EntityAddr
from .frames import FrameLimits
from .identity import IdentityCheck

__all__ = ["Config"]


@dataclass
class Config:
    """Per-messenger handshake parameters (no I/O inside)."""

    entity_type: int
    my_addr: EntityAddr
    gid: int = 0
    features_supported: int = feat.SUPPORTED          # banner bits
    features_required: int = feat.REQUIRED
    ceph_features_supported: int = ceph_feat.SUPPORTED  # CLIENT_IDENT / SERVER_IDENT
    ceph_features_required: int = ceph_feat.REQUIRED
    limits: FrameLimits = field(default_factory=FrameLimits)
    client_auth: Callable[[], ClientAuth] = NoneClientAuth
    #: one ServerAuth per accepted connection (it may hold that connection's nonces)
    server_auth: Callable[[], ServerAuth] = NoneServerAuth
    #: fresh messenger-wide global_seq strictly greater than the argument
    next_global_seq: Callable[[int], int] = lambda old: old + 1
    #: random non-zero 64-bit cookie
    new_cookie: Callable[[], int] = lambda: 1
    #: a client's judgement of SERVER_IDENT addresses (:mod:`protocol.identity`)
    identity_check: IdentityCheck = IdentityCheck.STRICT
