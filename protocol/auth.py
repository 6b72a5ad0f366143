"""Authentication seam of the handshake (AUTH_REQUEST ... AUTH_DONE, AUTH_SIGNATURE).

Method ``none`` (Ceph's number 1) and asyncmsgr's shared-secret method (number
``AUTH_SECRET``, which Ceph does not use; with its own secure mode) plug in through the
same two classes. cephx (2) is not implemented. An authenticator sees the auth frames' payloads and, once
done, yields a session key. AUTH_SIGNATURE is HMAC-SHA256 keyed by that key over every
raw byte this side *received* before auth completed (banner and whole frames,
:mod:`protocol.transcript`); the peer checks it against what it *sent*, which binds the
plaintext banner, hello and auth exchange.
With no key (method none) the signature is 32 zero bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as _secrets
from collections import OrderedDict
from dataclasses import dataclass

from .ceph.entity import EntityName, mon_auth_payload
from .control import AUTH_NONE, AUTH_SECRET, MODE_CRC, MODE_SECURE
from .errors import RemoteProtocolError

__all__ = ["AuthResult", "AuthStats", "ClientAuth", "ServerAuth", "NoneClientAuth",
           "NoneServerAuth", "RefuseServerAuth", "SecretClientAuth", "SecretServerAuth", "derive_session_key",
           "signature", "ZERO_SIGNATURE"]

ZERO_SIGNATURE = bytes(32)


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Outcome of a finished auth exchange."""

    global_id: int
    con_mode: int
    session_key: bytes | None


def signature(key: bytes | None, transcript: bytes) -> bytes:
    """AUTH_SIGNATURE payload for a transcript (zeros without a key)."""
    if not key:
        return ZERO_SIGNATURE
    return hmac.new(key, transcript, hashlib.sha256).digest()


class ClientAuth:
    """Client side of an auth method."""

    method: int = AUTH_NONE
    wants_transcript: bool = False

    def request(self) -> tuple[int, tuple[int, ...], bytes]:
        """(method, preferred modes, payload) for AUTH_REQUEST."""
        raise NotImplementedError

    def more(self, payload: bytes) -> bytes:
        """Answer to AUTH_REPLY_MORE."""
        raise RemoteProtocolError("server asked for more auth data; method has no rounds",
                                  "auth")

    def done(self, global_id: int, con_mode: int, payload: bytes) -> AuthResult:
        raise NotImplementedError


class ServerAuth:
    """Server side of an auth method. ``methods`` and ``modes`` are what AUTH_BAD_METHOD
    tells a refused client this server allows."""

    wants_transcript: bool = False
    methods: tuple[int, ...] = (AUTH_NONE,)
    modes: tuple[int, ...] = (MODE_CRC,)

    def handle_request(self, method: int, modes: tuple[int, ...], payload: bytes
                       ) -> tuple[str, object]:
        """Return ("done", AuthResult) | ("more", bytes) | ("bad", reason)."""
        raise NotImplementedError

    def handle_more(self, payload: bytes) -> tuple[str, object]:
        return ("bad", "unexpected AUTH_REQUEST_MORE")


class NoneClientAuth(ClientAuth):
    """Method none: no credentials, crc mode. The payload is the one a mon expects
    (``protocol.ceph.entity``); asyncmsgr servers ignore it."""

    def __init__(self, name: str = "client.admin") -> None:
        self.payload = mon_auth_payload(EntityName.parse(name))

    def request(self) -> tuple[int, tuple[int, ...], bytes]:
        return (AUTH_NONE, (MODE_CRC,), self.payload)

    def done(self, global_id: int, con_mode: int, payload: bytes) -> AuthResult:
        if con_mode != MODE_CRC:
            raise RemoteProtocolError(f"server chose connection mode {con_mode}, "
                                      "but auth none only supports crc mode", "auth")
        return AuthResult(global_id, con_mode, None)


class RefuseServerAuth(ServerAuth):
    """Turn every client away with -EBUSY (msgr2's way to kick a client): used when a
    worker is at its connection limit."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def handle_request(self, method: int, modes: tuple[int, ...], payload: bytes
                       ) -> tuple[str, object]:
        return ("busy", self.reason)


class NoneServerAuth(ServerAuth):
    """Method none: accept anyone in crc mode."""

    def __init__(self) -> None:
        self._next_id = 0

    def handle_request(self, method: int, modes: tuple[int, ...], payload: bytes
                       ) -> tuple[str, object]:
        if method != AUTH_NONE:
            return ("bad", f"auth method {method} not allowed; this server allows none")
        if MODE_CRC not in modes:
            return ("bad", "client does not offer crc mode")
        self._next_id += 1
        return ("done", AuthResult(self._next_id, MODE_CRC, None))


# -- shared-secret method ---------------------------------------------------------------------
#
# AUTH_REQUEST      client -> server: u8 name length, entity name, 32-byte client nonce
# AUTH_REPLY_MORE   server -> client: 32-byte server nonce, server proof
# AUTH_REQUEST_MORE client -> server: client proof
# AUTH_DONE         server -> client: con_mode chosen (crc or secure)
#
# proof = HMAC-SHA256(key, label | nonce_a | nonce_b | name). Each side proves the key over
# the other side's fresh nonce, so a recorded proof is useless on a new connection. The
# session key (for AUTH_SIGNATURE and secure mode) is derived from both nonces.

_NONCE = 32
_MAX_NAME = 64


def _proof(key: bytes, label: bytes, a: bytes, b: bytes, name: bytes) -> bytes:
    return hmac.new(key, label + a + b + name, hashlib.sha256).digest()


def derive_session_key(key: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(key, b"asyncmsgr-session" + client_nonce + server_nonce,
                    hashlib.sha256).digest()


class AuthStats:
    """Rejections by reason, for the pool's perf counters."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def count(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1


class SecretClientAuth(ClientAuth):
    """Client side of the shared-secret method."""

    method = AUTH_SECRET
    wants_transcript = True

    def __init__(self, name: str, key: bytes, modes: tuple[int, ...] = (MODE_CRC,)) -> None:
        raw = name.encode()
        if not raw or len(raw) > _MAX_NAME:
            raise ValueError(f"entity name must be 1..{_MAX_NAME} bytes, got {name!r}")
        if len(key) < 16:
            raise ValueError("a secret key must be at least 16 bytes")
        self.name = raw
        self.key = key
        self.modes = modes
        self.client_nonce = _secrets.token_bytes(_NONCE)
        self.server_nonce = b""

    def request(self) -> tuple[int, tuple[int, ...], bytes]:
        return (AUTH_SECRET, self.modes, bytes([len(self.name)]) + self.name + self.client_nonce)

    def more(self, payload: bytes) -> bytes:
        if len(payload) != _NONCE + 32:
            raise RemoteProtocolError("malformed server challenge", "auth")
        sn, proof = payload[:_NONCE], payload[_NONCE:]
        want = _proof(self.key, b"asyncmsgr-server", self.client_nonce, sn, self.name)
        if not hmac.compare_digest(proof, want):
            raise RemoteProtocolError("server failed to prove the shared key: wrong keyring "
                                      "or an impostor server", "auth")
        self.server_nonce = sn
        return _proof(self.key, b"asyncmsgr-client", sn, self.client_nonce, self.name)

    def done(self, global_id: int, con_mode: int, payload: bytes) -> AuthResult:
        if not self.server_nonce:
            raise RemoteProtocolError("AUTH_DONE before the challenge round", "auth")
        if con_mode not in self.modes:
            raise RemoteProtocolError(f"server chose mode {con_mode}, we offered "
                                      f"{list(self.modes)}", "auth")
        return AuthResult(global_id, con_mode,
                          derive_session_key(self.key, self.client_nonce, self.server_nonce))


class SecretServerAuth(ServerAuth):
    """Server side: one instance per connection (it holds that connection's nonces); the
    keyring, the mode policy, the replay window and the counters are shared."""

    wants_transcript = True
    methods = (AUTH_SECRET,)

    def __init__(self, keyring: dict[str, bytes], mode: int, stats: AuthStats,
                 seen: OrderedDict[bytes, None], window: int = 4096,
                 allow_none: bool = False) -> None:
        self.keyring = keyring
        self.mode = mode
        self.stats = stats
        self.seen = seen
        self.window = window
        self.allow_none = allow_none
        self.modes = (mode,)
        self.name = b""
        self.client_nonce = b""
        self.server_nonce = b""
        self.key = b""
        self._ids = 0

    def handle_request(self, method: int, modes: tuple[int, ...], payload: bytes
                       ) -> tuple[str, object]:
        if method != AUTH_SECRET:
            self.stats.count("bad_method")
            return ("bad", f"auth method {method} not allowed; this server requires the "
                           "shared-secret method (--auth secret with a keyring)")
        if self.mode not in modes:
            self.stats.count("bad_mode")
            return ("bad", f"client does not offer mode {self.mode} "
                           f"({'secure' if self.mode == MODE_SECURE else 'crc'}) required here")
        if not payload or len(payload) != 1 + payload[0] + _NONCE or payload[0] > _MAX_NAME:
            self.stats.count("malformed")
            return ("bad", "malformed auth request")
        name = payload[1:1 + payload[0]]
        cn = payload[1 + payload[0]:]
        try:
            key = self.keyring.get(name.decode())
        except UnicodeDecodeError:
            key = None
        if key is None:
            self.stats.count("unknown_entity")
            return ("bad", f"unknown entity {name!r}: not in the server's keyring")
        if cn in self.seen:
            self.stats.count("replay")
            return ("bad", "replayed challenge: this client nonce was already used")
        self.seen[cn] = None
        while len(self.seen) > self.window:
            self.seen.popitem(last=False)
        self.name, self.client_nonce, self.key = name, cn, key
        self.server_nonce = _secrets.token_bytes(_NONCE)
        return ("more", self.server_nonce + _proof(key, b"asyncmsgr-server", cn,
                                                   self.server_nonce, name))

    def handle_more(self, payload: bytes) -> tuple[str, object]:
        if not self.server_nonce:
            self.stats.count("malformed")
            return ("bad", "AUTH_REQUEST_MORE before a challenge")
        want = _proof(self.key, b"asyncmsgr-client", self.server_nonce, self.client_nonce,
                      self.name)
        if not hmac.compare_digest(bytes(payload), want):
            self.stats.count("wrong_key")
            return ("bad", f"wrong key for entity {self.name.decode(errors='replace')!r}")
        self._ids += 1
        return ("done", AuthResult(self._ids, self.mode,
                                   derive_session_key(self.key, self.client_nonce,
                                                      self.server_nonce)))
