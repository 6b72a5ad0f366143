"""The rdma stack's side channel: JSON messages with optional fds, one connection each.

A Unix SOCK_SEQPACKET socket (softverbs passes its regions' fds by SCM_RIGHTS) or TCP
with a 4-byte length prefix (pyverbs passes no fds). It carries the HELLO/ACK exchange
and then stays open only so that EOF tells one side the other is gone.
"""


from __future__ import annotations

import errno
import json
import logging
import socket
import struct
from collections.abc import Sequence
from typing import Any

from ..errors import BrokenResourceError
from ..fdpass import recv_fds, send_fds
from .verbs import (
    VerbsError,
)

__all__ = ["PROVIDER_ENV", "RdmaConnectedSocket", "RdmaServerSocket", "RdmaStack", "get_provider"]

log = logging.getLogger("transport.rdma")


__all__ = ["MAGIC", "SideChannel", "parse_side_message", "side_message"]

MAGIC = "amsgr-rdma/1"


def side_message(kind: str, **fields: Any) -> bytes:
    return json.dumps({"m": MAGIC, "kind": kind, **fields}).encode()


class SideChannel:
    """The side channel: whole messages with optional fds. SEQPACKET keeps boundaries;
    TCP gets a 4-byte length prefix and carries no fds."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seqpacket = sock.type == socket.SOCK_SEQPACKET
        self._rbuf = bytearray()

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if self.seqpacket:
            send_fds(self.sock, data, fds)
            return
        if fds:
            raise VerbsError(errno.EPROTONOSUPPORT, "a TCP side channel cannot pass fds (softverbs needs a Unix socket)")
        # Control messages are small and sent when the socket is idle: a blocking
        # sendall with a short timeout is bounded and keeps the framing trivial.
        self.sock.settimeout(5.0)
        try:
            self.sock.sendall(struct.pack("!I", len(data)) + data)
        finally:
            self.sock.setblocking(False)

    def recv(self) -> tuple[bytes, list[int]] | None:
        """One message; None when none is complete; (b"", []) at EOF."""
        if self.seqpacket:
            try:
                return recv_fds(self.sock, 65536, 16)
            except BlockingIOError:
                return None
        while True:
            if len(self._rbuf) >= 4:
                (n,) = struct.unpack_from("!I", self._rbuf)
                if n > 1 << 20:
                    raise BrokenResourceError(errno.EPROTO, "side-channel message too large")
                if len(self._rbuf) >= 4 + n:
                    data = bytes(self._rbuf[4: 4 + n])
                    del self._rbuf[: 4 + n]
                    return data, []
            try:
                got = self.sock.recv(65536)
            except BlockingIOError:
                return None
            if not got:
                return b"", []
            self._rbuf += got

    def peer_pid(self) -> int | None:
        if self.sock.family != socket.AF_UNIX:
            return None
        try:
            cred = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        pid = struct.unpack("3i", cred)[0]
        return pid or None

    def close(self) -> None:
        self.sock.close()


def parse_side_message(data: bytes, want: str) -> dict[str, Any]:
    try:
        msg = json.loads(data)
    except ValueError as exc:
        raise BrokenResourceError(errno.EPROTO, f"bad side-channel message: {exc}") from None
    if not isinstance(msg, dict) or msg.get("m") != MAGIC or msg.get("kind") != want:
        raise BrokenResourceError(errno.EPROTO, f"expected {want} on the rdma side channel")
    return msg
