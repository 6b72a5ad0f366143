"""Secure mode: every frame after AUTH_DONE travels as one AES-128-GCM record.

Record: ``le32 length`` (authenticated as associated data, checked against the frame caps
*before* allocating) followed by the ciphertext of one whole crc-mode frame and the
16-byte GCM tag. The nonce is a 4-byte per-direction salt plus a 64-bit counter that
increments per record; keys and salts come from the session key of the auth exchange, one
pair per direction. Any altered, dropped, reordered or replayed byte fails the tag check
and faults the connection. The counter never wraps: the connection faults before, and the
reconnect derives fresh keys (asyncmsgr's own record format; Ceph's rev1 secure framing
splits the preamble and segments differently).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence

from .buffer import Buffer
from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["SecureChannel", "TAG_SIZE", "RECORD_HEADER"]

TAG_SIZE = 16
RECORD_HEADER = struct.Struct("<I")
_NONCE_PREFIX = struct.Struct("<4sQ")
_COUNTER_LIMIT = (1 << 64) - 1


def _derive(session_key: bytes, label: bytes) -> tuple[bytes, bytes]:
    block = hmac.new(session_key, b"asyncmsgr-secure-" + label, hashlib.sha256).digest()
    return block[:16], block[16:20]


class SecureChannel:
    """Both directions of one connection's secure mode."""

    def __init__(self, session_key: bytes, client: bool, max_record: int) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise LocalProtocolError("secure mode needs the 'cryptography' package",
                                     "secure") from err
        c2s_key, c2s_salt = _derive(session_key, b"c2s")
        s2c_key, s2c_salt = _derive(session_key, b"s2c")
        tx = (c2s_key, c2s_salt) if client else (s2c_key, s2c_salt)
        rx = (s2c_key, s2c_salt) if client else (c2s_key, c2s_salt)
        self._tx = AESGCM(tx[0])
        self._tx_salt = tx[1]
        self._rx = AESGCM(rx[0])
        self._rx_salt = rx[1]
        self.tx_counter = 0
        self.rx_counter = 0
        self.max_record = max_record
        self._buf = bytearray()

    def seal(self, frame: Sequence[Buffer]) -> bytes:
        """One record for one frame's buffers."""
        if self.tx_counter >= _COUNTER_LIMIT:
            raise LocalProtocolError("secure-mode nonce counter exhausted; the connection "
                                     "must reconnect to derive new keys", "secure")
        plain = b"".join(frame)
        header = RECORD_HEADER.pack(len(plain) + TAG_SIZE)
        nonce = _NONCE_PREFIX.pack(self._tx_salt, self.tx_counter)
        self.tx_counter += 1
        return header + self._tx.encrypt(nonce, plain, header)

    def feed(self, data: Buffer) -> list[bytes]:
        """Ciphertext in; the plaintext of every complete record out."""
        buf = self._buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (ln,) = RECORD_HEADER.unpack_from(buf, pos)
            if ln < TAG_SIZE or ln > self.max_record:
                raise RemoteProtocolError(f"secure record of {ln} bytes outside "
                                          f"{TAG_SIZE}..{self.max_record}", "secure")
            if n - pos - 4 < ln:
                break
            if self.rx_counter >= _COUNTER_LIMIT:
                raise RemoteProtocolError("peer exhausted the secure-mode nonce counter",
                                          "secure")
            nonce = _NONCE_PREFIX.pack(self._rx_salt, self.rx_counter)
            header = bytes(buf[pos:pos + 4])
            try:
                plain = self._rx.decrypt(nonce, bytes(buf[pos + 4:pos + 4 + ln]), header)
            except Exception as err:  # InvalidTag
                raise RemoteProtocolError("secure frame failed authentication: altered or "
                                          "forged bytes on the wire", "secure") from err
            self.rx_counter += 1
            out.append(plain)
            pos += 4 + ln
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_pending(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data
