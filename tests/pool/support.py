"""Test support for pool tests: a raw echo app, a pool runner, and blocking clients.

``RawEchoApp`` speaks 4-byte big-endian length + payload and echoes each frame back. On
``begin_drain`` it migrates every connection with ``ctx.handoff``: the state blob is
its unparsed input plus its unsent output, so the stream continues byte-exactly on the
adopting worker.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pool.supervisor.admin import AdminClient, AdminError
from pool.worker.app import WorkerApp, WorkerContext
from transport.event_center import READABLE, WRITABLE
from transport.posix import PosixConnectedSocket
from transport.stack import ConnectedSocket

ROOT = Path(__file__).resolve().parents[2]
LEN = struct.Struct("!I")
META = struct.Struct("!II")


# -- the app -----------------------------------------------------------------------------

class _Conn:
    __slots__ = ("buf", "fd", "inbuf", "outbuf", "sock")

    def __init__(self, sock: ConnectedSocket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.buf = memoryview(bytearray(65536))


class RawEchoApp(WorkerApp):
    """Length-prefixed echo. Config: ``hang_after`` (s) + ``hang_once_file``: the loop
    blocks forever once, so the heartbeat check must kill it; ``ignore_sigabrt``;
    ``never_drain``."""

    def __init__(self) -> None:
        self.conns: dict[int, _Conn] = {}
        self.msgs_in = self.msgs_out = self.bytes_in = self.bytes_out = 0
        self.draining = False
        self.migrating = 0

    def start(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        if ctx.config.get("ignore_sigabrt"):
            # Test hook: replaces faulthandler's SIGABRT handler, so only the heartbeat
            # check's second stage (SIGKILL) can end a hung loop.
            signal.signal(signal.SIGABRT, signal.SIG_IGN)
        hang = ctx.config.get("hang_after")
        if hang is not None:
            ctx.center.create_time_event(float(hang), self._hang)

    def _hang(self) -> None:
        marker = self.ctx.config.get("hang_once_file")
        if marker:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # only the first worker hangs
        self.ctx.log("test hook: hanging the loop")
        while True:
            time.sleep(3600)

    def adopt(self, conn: ConnectedSocket, meta: bytes) -> bool:
        if self.draining:
            return False
        c = _Conn(conn)
        if meta:
            n_in, n_out = META.unpack_from(meta)
            c.inbuf += meta[META.size:META.size + n_in]
            c.outbuf += meta[META.size + n_in:META.size + n_in + n_out]
        self.conns[c.fd] = c
        self.ctx.center.create_file_event(c.fd, READABLE, self._on_read)
        self._parse(c)
        self._flush(c)
        return True

    def connection_count(self) -> int:
        return len(self.conns) + self.migrating

    def counters(self) -> tuple[int, int, int, int]:
        return self.msgs_in, self.msgs_out, self.bytes_in, self.bytes_out

    def _on_read(self, fd: int) -> None:
        c = self.conns.get(fd)
        if c is None:
            return
        try:
            n = c.sock.read_into(c.buf)
        except BlockingIOError:
            return
        except OSError:
            self._close(c)
            return
        if n == 0:
            self._close(c)
            return
        self.bytes_in += n
        c.inbuf += c.buf[:n]
        self._parse(c)
        self._flush(c)

    def _parse(self, c: _Conn) -> None:
        while len(c.inbuf) >= 4:
            (size,) = LEN.unpack_from(c.inbuf)
            if len(c.inbuf) < 4 + size:
                return
            c.outbuf += c.inbuf[:4 + size]
            del c.inbuf[:4 + size]
            self.msgs_in += 1
            self.msgs_out += 1

    def _flush(self, c: _Conn) -> None:
        while c.outbuf:
            try:
                n = c.sock.send([c.outbuf])
            except BlockingIOError:
                self.ctx.center.create_file_event(c.fd, WRITABLE, self._on_write)
                return
            except OSError:
                self._close(c)
                return
            self.bytes_out += n
            del c.outbuf[:n]
        self.ctx.center.delete_file_event(c.fd, WRITABLE)

    def _on_write(self, fd: int) -> None:
        c = self.conns.get(fd)
        if c is not None:
            self._flush(c)

    def _close(self, c: _Conn) -> None:
        self.ctx.center.delete_file_event(c.fd, READABLE | WRITABLE)
        self.conns.pop(c.fd, None)
        c.sock.close()
        self._maybe_drained()

    def begin_drain(self) -> None:
        self.draining = True
        if self.ctx.config.get("never_drain"):
            return  # test hook: only the supervisor's drain deadline can end this worker
        for c in list(self.conns.values()):
            self._migrate(c)
        self._maybe_drained()

    def _migrate(self, c: _Conn) -> None:
        # Stop at a frame boundary of *our* parsing: complete frames were already echoed
        # into outbuf; the rest of the stream (partial input, unsent output) travels.
        self.ctx.center.delete_file_event(c.fd, READABLE | WRITABLE)
        del self.conns[c.fd]
        self.migrating += 1
        meta = META.pack(len(c.inbuf), len(c.outbuf)) + bytes(c.inbuf) + bytes(c.outbuf)
        fd = c.sock.detach()
        targets = self.ctx.accepting_slots()

        def attempt() -> None:
            if not targets:
                self.ctx.log(f"no worker adopted fd {fd}: closing it")
                os.close(fd)
                self.migrating -= 1
                self._maybe_drained()
                return
            self.ctx.handoff(targets.pop(0), fd, meta, done)

        def done(ok: bool) -> None:
            if ok:
                os.close(fd)
                self.migrating -= 1
                self._maybe_drained()
            else:
                attempt()

        attempt()

    def _maybe_drained(self) -> None:
        if self.draining and not self.conns and not self.migrating:
            self.ctx.drained()

    def stop(self) -> None:
        for c in list(self.conns.values()):
            self.ctx.center.delete_file_event(c.fd, READABLE | WRITABLE)
            c.sock.close()
        self.conns.clear()


class FailingApp(RawEchoApp):
    """Raises in ``__init__`` when this worker's slot is in ``$MSGR_TEST_FAIL_SLOTS``
    (comma-separated, or ``all``): a boot failure before READY."""

    def __init__(self) -> None:
        want = os.environ.get("MSGR_TEST_FAIL_SLOTS", "")
        slot = os.environ.get("MSGR_WORKER_SLOT", "")
        if want == "all" or slot in want.split(","):
            raise RuntimeError(f"test: app refuses to start in slot {slot}")
        super().__init__()


# -- running a pool ------------------------------------------------------------------------

def msgr(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a child process (as a user would)."""
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def wait_for(cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)  # polling an external process's state, with a deadline


class Pool:
    """A ``msgr serve`` child process with helpers to observe and stop it."""

    def __init__(self, tmp: Path, workers: int = 2, accept: str = "processor",
                 app: str = "tests.pool.support:RawEchoApp", extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, launcher: tuple[str, ...] = (),
                 bind: str | None = "127.0.0.1:0") -> None:
        """``launcher`` runs before the interpreter (e.g. ``systemd-socket-activate -l
        ADDR``); ``bind=None`` passes no ``--bind``."""
        self.admin = str(tmp / "admin.sock")
        self.log_path = tmp / f"serve-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        cmd = [*launcher, sys.executable, "-m", "tools.cli", "serve",
               *(("--bind", bind) if bind is not None else ()), "--workers", str(workers),
               "--accept", accept, "--app", app, "--admin", self.admin, *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.client = AdminClient(self.admin, timeout=5.0)
        self.port = 0

    def log(self) -> str:
        return self.log_path.read_text()

    def status(self) -> dict[str, Any]:
        return self.client.call("status")

    def try_status(self) -> dict[str, Any] | None:
        try:
            return self.status()
        except (AdminError, OSError):
            return None

    def wait_accepting(self, n: int, timeout: float = 15.0) -> dict[str, Any]:
        def ok() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"msgr serve exited {self.proc.returncode}:\n{self.log()}")
            st = self.try_status()
            if st is None:
                return None
            states = [w["state"] for w in st["workers"]]
            settled = states.count("ACCEPTING") == n and not {
                "SPAWNING", "READY", "DRAINING", "QUIESCED", "STALLED", "BACKOFF"}.intersection(states)
            return st if settled else None

        st = wait_for(ok, timeout, f"{n} accepting workers")
        self.port = st["bind"][1]
        return st

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"] if w["pid"]]

    def stop(self, timeout: float = 15.0) -> int:
        """Graceful stop through the admin socket; SIGKILL (by pid) only as a fallback."""
        if self.proc.poll() is None:
            try:
                self.client.call("stop")
            except (AdminError, OSError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"msgr serve did not stop in {timeout}s:\n{self.log()}") from None
        finally:
            self._log.close()

    def kill_all(self) -> None:
        pids = []
        try:
            pids = self.worker_pids()
        except (AdminError, OSError):
            pass
        for pid in [self.proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


@contextmanager
def running_pool(tmp: Path, workers: int = 2, **kw: Any) -> Iterator[Pool]:
    pool = Pool(tmp, workers, **kw)
    try:
        pool.wait_accepting(workers)
        yield pool
    except BaseException:
        if pool.proc.poll() is None:
            pool.kill_all()
        pool._log.close()
        raise
    else:
        rc = pool.stop()
        assert rc == 0, f"msgr serve exited {rc}:\n{pool.log()}"


# -- clients -------------------------------------------------------------------------------

def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "EOF in the middle of an echo")
        buf += chunk
    return bytes(buf)


def echo(s: socket.socket, payload: bytes) -> None:
    s.sendall(LEN.pack(len(payload)) + payload)
    head = recv_exact(s, 4)
    got = recv_exact(s, LEN.unpack(head)[0])
    if got != payload:
        raise AssertionError(f"echo mismatch: sent {payload[:20]!r}, got {got[:20]!r}")


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Load:
    """Background client load: ``persistent`` connections doing echoes back to back, plus
    a stream of short-lived connections (connect, one echo, close). Counts resets and
    refusals separately from other failures."""

    def __init__(self, port: int, persistent: int = 4) -> None:
        self.port = port
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.echoes = 0
        self.new_conns = 0
        self.resets = 0
        self.refused = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._persistent, args=(i,), daemon=True)
                        for i in range(persistent)]
        self.threads.append(threading.Thread(target=self._churn, daemon=True))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(15)

    def _count(self, exc: BaseException) -> None:
        with self.lock:
            if isinstance(exc, ConnectionRefusedError):
                self.refused += 1
            elif isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                self.resets += 1
            else:
                self.errors.append(repr(exc))

    def _persistent(self, i: int) -> None:
        try:
            s = connect(self.port)
        except OSError as exc:
            self._count(exc)
            return
        with s:
            seq = 0
            while not self.stop_flag.is_set():
                try:
                    echo(s, f"conn{i}-msg{seq}-".encode() * (1 + seq % 7))
                except (OSError, AssertionError) as exc:
                    self._count(exc)
                    return
                seq += 1
                with self.lock:
                    self.echoes += 1

    def _churn(self) -> None:
        n = 0
        while not self.stop_flag.is_set():
            try:
                with connect(self.port) as s:
                    echo(s, f"churn{n}".encode())
            except (OSError, AssertionError) as exc:
                self._count(exc)
            n += 1
            with self.lock:
                self.new_conns += 1

    def summary(self) -> dict[str, Any]:
        return {"echoes": self.echoes, "new_conns": self.new_conns, "resets": self.resets,
                "refused": self.refused, "errors": self.errors[:5]}


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (VmRSS in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def proc_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)


__all__ = [
    "FailingApp",
    "Load",
    "Pool",
    "PosixConnectedSocket",
    "RawEchoApp",
    "connect",
    "echo",
    "msgr",
    "proc_alive",
    "running_pool",
    "wait_for",
]
