"""Authentication settings for a Messenger: method, connection mode, keyring.

A keyring is a TOML file mapping entity names to base64 keys (at least 16 bytes)::

    [keys]
    "client.admin" = "q83vEjRWeJq8..."
    "osd.0" = "..."

It must not be readable or writable by group or others (mode 0600), like an ssh key:
anyone who can read it can impersonate every entity in it.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import tomllib
from collections import OrderedDict
from dataclasses import dataclass, field

from protocol.auth import AuthStats, NoneClientAuth, SecretClientAuth, SecretServerAuth
from protocol.connection import Config
from protocol.control import MODE_CRC, MODE_SECURE

__all__ = ["AuthSettings", "KeyringError", "load_keyring", "write_keyring"]


class KeyringError(ValueError):
    """The keyring file is missing, unsafe or malformed; the message says how to fix it."""


def load_keyring(path: str) -> dict[str, bytes]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KeyringError(f"keyring {path} does not exist (create it with `msgr keyring "
                           f"--create {path} NAME...`)") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyringError(f"keyring {path} is accessible by group/others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {path}`")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise KeyringError(f"keyring {path} is not valid TOML: {err}") from None
    table = data.get("keys", data)
    if not isinstance(table, dict) or not table:
        raise KeyringError(f"keyring {path} has no [keys] table of name = \"base64 key\"")
    out: dict[str, bytes] = {}
    for name, value in table.items():
        if not isinstance(value, str):
            raise KeyringError(f"keyring {path}: key for {name!r} must be a base64 string")
        try:
            key = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise KeyringError(f"keyring {path}: key for {name!r} is not valid base64") from None
        if len(key) < 16:
            raise KeyringError(f"keyring {path}: key for {name!r} is {len(key)} bytes; "
                               "use at least 16 random bytes")
        out[name] = key
    return out


def write_keyring(path: str, keys: dict[str, bytes]) -> None:
    """Create a keyring file with mode 0600 (for tools and tests)."""
    lines = ["[keys]"] + [f'"{n}" = "{base64.b64encode(k).decode()}"' for n, k in keys.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)


@dataclass
class AuthSettings:
    """How a Messenger authenticates: ``method`` none|secret, ``mode`` crc|secure."""

    method: str = "none"
    mode: str = "crc"
    name: str = "client.admin"          # who we are when we connect
    keyring: dict[str, bytes] = field(default_factory=dict)
    stats: AuthStats = field(default_factory=AuthStats)

    def __post_init__(self) -> None:
        if self.method not in ("none", "secret"):
            raise ValueError(f"auth method {self.method!r}: choose none or secret")
        if self.mode not in ("crc", "secure"):
            raise ValueError(f"connection mode {self.mode!r}: choose crc or secure")
        if self.mode == "secure" and self.method != "secret":
            raise ValueError("secure mode needs --auth secret (auth none has no key to "
                             "encrypt with)")
        if self.method == "secret" and not self.keyring:
            raise ValueError("--auth secret needs a --keyring")

    def apply(self, config: Config) -> None:
        if self.method == "none":
            name = self.name
            config.client_auth = lambda: NoneClientAuth(name)
            return
        mode = MODE_SECURE if self.mode == "secure" else MODE_CRC
        keyring = self.keyring
        name = self.name
        seen: OrderedDict[bytes, None] = OrderedDict()
        stats = self.stats

        def client() -> SecretClientAuth:
            key = keyring.get(name)
            if key is None:
                raise ValueError(f"entity {name!r} has no key in the keyring")
            return SecretClientAuth(name, key, (mode,))

        config.client_auth = client
        config.server_auth = lambda: SecretServerAuth(keyring, mode, stats, seen)
