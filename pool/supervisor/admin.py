"""The admin socket: a Unix stream socket speaking 4-byte big-endian length + JSON.

Same framing as gunicorn's control socket (``gunicorn/ctl/protocol.py``). A request is a
JSON object ``{"cmd": NAME, ...arguments}``; every reply is a JSON object with ``"ok"``.
A bad request gets ``{"ok": false, "error": "<what was wrong and what to do>"}`` and, when
the stream can no longer be trusted (oversized or truncated frame), the connection is
closed after the reply. Nothing a client sends can raise out of the server.

The server runs on the supervisor's EventCenter; :class:`AdminClient` is blocking.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from transport.event_center import READABLE, WRITABLE, EventCenter

__all__ = ["MAX_REQUEST", "AdminClient", "AdminError", "AdminServer", "Handler", "default_admin_path"]

MAX_REQUEST = 64 * 1024
MAX_REPLY = 16 * 1024 * 1024
MAX_CLIENTS = 64
_LEN = struct.Struct("!I")

#: a handler gets the request's arguments and returns the reply (``ok`` is added)
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class AdminError(RuntimeError):
    """The admin call failed: no pool there, timeout, or an error reply."""


def default_admin_path() -> str:
    """``$XDG_RUNTIME_DIR/asyncmsgr/admin.sock``, else ``/tmp/asyncmsgr-$UID/admin.sock``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    d = os.path.join(base, "asyncmsgr") if base else f"/tmp/asyncmsgr-{os.getuid()}"
    return os.path.join(d, "admin.sock")


def _encode(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


class _Client:
    __slots__ = ("closing", "discarded", "inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closing = False
        self.discarded = 0


class AdminServer:
    """Serves admin requests on ``path`` from ``center``'s loop."""

    def __init__(self, center: EventCenter, path: str, handlers: dict[str, Handler],
                 log: Callable[[str], None] = lambda m: None) -> None:
        self.center = center
        self.path = path
        self.handlers = handlers
        self.log = log
        self._clients: dict[int, _Client] = {}
        self._sock = self._bind(path)
        center.create_file_event(self._sock.fileno(), READABLE, self._on_accept)

    @staticmethod
    def _bind(path: str) -> socket.socket:
        if len(path.encode()) > 107:  # sun_path is 108 bytes with the NUL (unix(7))
            raise AdminError(f"admin socket path is too long ({len(path)} > 107 bytes): "
                             "choose a shorter --admin PATH")
        d = os.path.dirname(path) or "."
        os.makedirs(d, mode=0o700, exist_ok=True)
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise AdminError(f"{path} exists and is not a socket: remove it or pick another --admin PATH")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # left by a pool that died (SIGKILL skips our unlink)
            except OSError:
                os.unlink(path)
            else:
                raise AdminError(f"another pool is already serving on {path}: stop it "
                                 "(msgr stop --admin PATH) or pick another --admin PATH")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def _on_accept(self, _fd: int) -> None:
        for _ in range(64):  # bounded per wake-up
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log(f"admin accept failed: {exc}")
                return
            if len(self._clients) >= MAX_CLIENTS:
                conn.close()
                continue
            conn.setblocking(False)
            c = _Client(conn)
            self._clients[conn.fileno()] = c
            self.center.create_file_event(conn.fileno(), READABLE, self._on_read)

    def _on_read(self, fd: int) -> None:
        c = self._clients.get(fd)
        if c is None:
            return
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        if c.closing:
            # After an error reply we read and discard until EOF: closing a socket with
            # unread input sends RST (RFC 1122 4.2.2.13), which could destroy the reply
            # before the client reads it.
            c.discarded += len(data)
            if not data or c.discarded > MAX_REPLY:
                self._drop(c)
            return
        if not data:
            if c.inbuf:
                self._reply_error(c, f"request truncated: got {len(c.inbuf)} bytes of a frame; "
                                  "send a 4-byte big-endian length then that many bytes of JSON", close=True)
            else:
                self._drop(c)
            return
        c.inbuf += data
        while len(c.inbuf) >= 4 and not c.closing:
            (n,) = _LEN.unpack_from(c.inbuf)
            if n > MAX_REQUEST:
                self._reply_error(c, f"request of {n} bytes exceeds the {MAX_REQUEST}-byte limit: "
                                  "admin requests are small JSON objects like {\"cmd\": \"status\"}", close=True)
                return
            if len(c.inbuf) < 4 + n:
                return
            body = bytes(c.inbuf[4:4 + n])
            del c.inbuf[:4 + n]
            self._queue(c, self._handle(body))

    def _handle(self, body: bytes) -> dict[str, Any]:
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": f"request is not valid JSON ({exc}); send an object like "
                                          "{\"cmd\": \"status\"}"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": "request must be a JSON object with a string \"cmd\"; "
                                          f"commands: {', '.join(sorted(self.handlers))}"}
        cmd = req.pop("cmd")
        handler = self.handlers.get(cmd)
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r}; commands: {', '.join(sorted(self.handlers))}"}
        try:
            reply = handler(req)
        except (ValueError, TypeError, KeyError) as exc:
            return {"ok": False, "error": f"{cmd}: {exc}"}
        except Exception as exc:  # a handler bug must not take the supervisor down
            self.log(f"admin {cmd} failed: {exc!r}")
            return {"ok": False, "error": f"{cmd} failed inside the supervisor: {exc!r}"}
        return {"ok": True, **reply} if "ok" not in reply else reply

    def _reply_error(self, c: _Client, msg: str, close: bool) -> None:
        self._queue(c, {"ok": False, "error": msg})
        if close:
            c.closing = True
            c.inbuf.clear()

    def _queue(self, c: _Client, reply: dict[str, Any]) -> None:
        c.outbuf += _encode(reply)
        self._on_write(c.sock.fileno())

    def _on_write(self, fd: int) -> None:
        c = self._clients.get(fd)
        if c is None:
            return
        while c.outbuf:
            try:
                n = c.sock.send(c.outbuf, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                self.center.create_file_event(fd, WRITABLE, self._on_write)
                return
            except OSError:
                self._drop(c)
                return
            del c.outbuf[:n]
        self.center.delete_file_event(fd, WRITABLE)
        if c.closing:
            try:
                c.sock.shutdown(socket.SHUT_WR)  # the client sees EOF after the reply
            except OSError:
                self._drop(c)

    def _drop(self, c: _Client) -> None:
        fd = c.sock.fileno()
        self.center.delete_file_event(fd, READABLE | WRITABLE)
        self._clients.pop(fd, None)
        c.sock.close()

    def close(self) -> None:
        """Close every client and the listener, and remove the socket file."""
        for c in list(self._clients.values()):
            self._drop(c)
        if self._sock.fileno() >= 0:
            self.center.delete_file_event(self._sock.fileno(), READABLE)
            self._sock.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class AdminClient:
    """Blocking client: ``AdminClient(path).call("scale", n=3)`` returns the reply dict.

    Raises :class:`AdminError` when no pool answers at ``path``, on timeout, or when
    the reply says ``ok: false`` (unless ``check=False``).
    """

    def __init__(self, path: str | None = None, timeout: float = 5.0) -> None:
        self.path = path or default_admin_path()
        self.timeout = timeout

    def call(self, cmd: str, *, check: bool = True, **args: Any) -> dict[str, Any]:
        return self.raw(_encode({"cmd": cmd, **args}), check=check)

    def raw(self, frame: bytes, *, check: bool = True) -> dict[str, Any]:
        """Send pre-framed bytes (tests use this for malformed requests)."""
        deadline = time.monotonic() + self.timeout
        s = self._connect(deadline)
        try:
            s.sendall(frame)
            head = self._recv_exact(s, 4, deadline)
            (n,) = _LEN.unpack(head)
            if n > MAX_REPLY:
                raise AdminError(f"reply of {n} bytes is larger than {MAX_REPLY}: not an asyncmsgr pool?")
            reply = json.loads(self._recv_exact(s, n, deadline))
        except TimeoutError:
            raise AdminError(f"no reply from {self.path} within {self.timeout} s") from None
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                raise AdminError(f"the pool at {self.path} closed the connection ({exc.strerror})") from None
            raise
        finally:
            s.close()
        if not isinstance(reply, dict):
            raise AdminError(f"malformed reply from {self.path}: {reply!r}")
        if check and not reply.get("ok", False):
            raise AdminError(str(reply.get("error", reply)))
        return reply

    def _connect(self, deadline: float) -> socket.socket:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
                return s
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                s.close()
                raise AdminError(f"no pool is serving at {self.path} ({exc.strerror}): start one with "
                                 "`msgr serve --admin PATH` or pass the right --admin PATH") from None
            except BlockingIOError:
                # A full listen backlog makes a Unix-socket connect fail with EAGAIN
                # instead of waiting (unix(7)) once a timeout is set: retry to the deadline.
                s.close()
                if time.monotonic() > deadline:
                    raise AdminError(f"the pool at {self.path} accepted no connection within "
                                     f"{self.timeout} s (backlog full)") from None
                time.sleep(0.005)
            except BaseException:
                s.close()
                raise

    @staticmethod
    def _recv_exact(s: socket.socket, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise AdminError("the pool closed the admin connection before replying")
            buf += chunk
        return bytes(buf)
