"""systemd: socket activation through Debian's real ``systemd-socket-activate``, and
readiness over a ``NOTIFY_SOCKET`` datagram socket that the test binds and reads."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pool.supervisor.systemd import Notifier, watchdog_interval
from tools.common import free_port

from .support import ROOT, Pool, connect, echo, wait_for

pytestmark = pytest.mark.timeout(120)

SSA = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
needs_ssa = pytest.mark.skipif(not os.path.exists(SSA), reason="systemd-socket-activate is not installed")
APP = "tests.pool.support:RawEchoApp"


def _trigger(port: int) -> socket.socket:
    """Connect until systemd-socket-activate listens; that connection makes it exec us."""
    def attempt() -> socket.socket | None:
        try:
            return connect(port)
        except ConnectionRefusedError:
            return None
    s: socket.socket = wait_for(attempt, 20, f"systemd-socket-activate listening on {port}")
    return s


@needs_ssa
@pytest.mark.parametrize("accept", ["processor", "reuseport"])
def test_socket_activation_serves_the_inherited_socket(tmp_path: Path, accept: str) -> None:
    port = free_port()
    pool = Pool(tmp_path, 2, accept=accept, app=APP, bind=None,
                launcher=(SSA, "-l", f"127.0.0.1:{port}", "-E", f"PYTHONPATH={ROOT}"))
    try:
        first = _trigger(port)  # queued in the inherited listener before the pool exists
        st = pool.wait_accepting(2, timeout=30)
        assert pool.proc.pid == st["pid"]  # systemd-socket-activate exec'd msgr serve
        assert st["bind"] == ["127.0.0.1", port]
        echo(first, b"the connection that woke us")
        conns = [connect(port) for _ in range(8)]
        for i, c in enumerate(conns):
            for j in range(20):
                echo(c, f"{accept} conn {i} msg {j}".encode() * 10)
        served = [w["msgs_in"] for w in pool.status()["workers"]]
        if accept == "reuseport":
            assert all(w["listeners"] == [0] for w in pool.status()["workers"])  # shared queue
        assert sum(served) >= 8 * 20 + 1
        for c in [first, *conns]:
            c.close()
        assert "Listening on 127.0.0.1" in pool.log()
    except BaseException:
        if pool.proc.poll() is None:
            pool.kill_all()
        raise
    assert pool.stop() == 0, pool.log()
    # The supervisor's copy was the last one: the port is closed with the pool.
    with pytest.raises(ConnectionRefusedError):
        connect(port).close()


#: what systemd does before exec: the socket at fd 3, LISTEN_FDS=1, LISTEN_PID = the pid
#: that exec keeps (or the given one)
_LAUNCH = """
import os, sys
fd, pid = int(sys.argv[1]), sys.argv[2]
os.dup2(fd, 3)
os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=pid or str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "tools.cli", "serve", *sys.argv[3:]])
"""


def _serve_with_fd3(tmp_path: Path, sock: socket.socket, listen_pid: str = "",
                    *args: str) -> subprocess.CompletedProcess[str]:
    """Run msgr serve with ``sock`` as fd 3 and LISTEN_FDS=1, the way systemd would."""
    fd = sock.fileno()
    return subprocess.run([sys.executable, "-c", _LAUNCH, str(fd), listen_pid, "--workers", "1",
                           "--admin", str(tmp_path / "a.sock"), "--boot-timeout", "5", *args],
                          cwd=ROOT, pass_fds=(fd,), capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("case", ["other pid", "udp", "not listening"])
def test_bad_activation_environments_are_refused_with_the_reason(tmp_path: Path, case: str) -> None:
    if case == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
    else:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        if case == "other pid":
            s.listen(4)
    with s:
        r = _serve_with_fd3(tmp_path, s, "1" if case == "other pid" else "")
    assert r.returncode == 2, r.stderr
    expect = {"other pid": "LISTEN_PID=1 is not this process", "udp": "fd 3 is a datagram socket",
              "not listening": "a stream socket that is not listening"}[case]
    assert "msgr serve: socket activation: " in r.stderr and expect in r.stderr, r.stderr


def test_bind_and_activation_together_is_an_error(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    with s:
        r = _serve_with_fd3(tmp_path, s, "", "--bind", "127.0.0.1:0")
    assert r.returncode == 2 and "both given: drop --bind" in r.stderr, r.stderr


class NotifyReader:
    """The systemd side of sd_notify: a datagram socket the pool writes to."""

    def __init__(self, tmp: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"asyncmsgr-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            path = str(tmp / "notify.sock")
            self.sock.bind(path)
            self.env = path
        self.seen: list[dict[str, str]] = []

    def next(self, timeout: float = 30.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        msg = dict(line.split("=", 1) for line in data.split("\n") if line)
        self.seen.append(msg)
        return msg

    def until(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.01, deadline - time.monotonic()))
            if key in msg:
                return msg

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_readiness_reloading_stopping_and_watchdog(tmp_path: Path, abstract: bool) -> None:
    reader = NotifyReader(tmp_path, abstract)
    pool = Pool(tmp_path, 2, app=APP, extra=("--boot-timeout", "20"),
                env={"NOTIFY_SOCKET": reader.env, "WATCHDOG_USEC": "200000"})
    try:
        ready = reader.until("READY")
        # READY=1 only once both workers accept: the pool says so itself at that moment.
        assert ready["READY"] == "1"
        assert ready["STATUS"].startswith("2/2 workers accepting on 127.0.0.1:")
        st = pool.status()
        assert st["accepting"] == 2
        before = reader.seen[:-1]
        assert before and all("READY" not in m for m in before)
        assert any(m.get("STATUS", "").startswith("0/2") for m in before)
        # Watchdog pings every WATCHDOG_USEC/2 from the supervisor's loop.
        for _ in range(3):
            assert reader.until("WATCHDOG", timeout=10)["WATCHDOG"] == "1"
        # Scaling is a reload: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again.
        pool.client.call("scale", n=3)
        reloading = reader.until("RELOADING")
        assert reloading["RELOADING"] == "1"
        assert int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        again = reader.until("READY")
        assert again["STATUS"].startswith("3/3 workers accepting")
        assert pool.status()["accepting"] == 3
        pool.proc.send_signal(signal.SIGTERM)
        stopping = reader.until("STOPPING")
        assert stopping["STOPPING"] == "1"
        assert pool.proc.wait(30) == 0, pool.log()
    except BaseException:
        if pool.proc.poll() is None:
            pool.kill_all()
        raise
    finally:
        reader.close()
        pool._log.close()


def test_watchdog_interval_follows_watchdog_pid() -> None:
    assert watchdog_interval({}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}, pid=7) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "7"}, pid=7) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "8"}, pid=7) is None


def test_notifier_without_a_socket_is_silent_and_a_dead_socket_does_not_raise(tmp_path: Path) -> None:
    assert Notifier("").notify("READY=1") is False
    reader = NotifyReader(tmp_path, abstract=False)
    n = Notifier(reader.env)
    assert n.notify("READY=1", "STATUS=x")
    assert reader.next(5) == {"READY": "1", "STATUS": "x"}
    reader.close()
    os.unlink(reader.env)
    assert n.notify("STOPPING=1") is False and n.failures == 1
    n.close()
