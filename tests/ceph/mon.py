"""A real ceph-mon for tests: bootstrapped in a tmp directory, stopped by its pid.

``CephMon.start(dir)`` writes a ``ceph.conf`` (auth none, msgr2 only, every path under
``dir``; ``auth="cephx"`` for a mon that refuses auth none), makes the monmap and keyring, runs ``ceph-mon --mkfs`` and starts
``ceph-mon -f`` as a child process on a free loopback port. It is ready when its port
answers with a msgr2 banner and ``ceph -s`` succeeds (polled with a deadline). ``stop()`` sends SIGTERM to that
pid (SIGKILL after a bounded wait) and reaps it. ``restart()`` does both on the same
port and data, so a connected client sees the mon go away and come back.

If ceph-mon is not installed, :data:`MISSING` holds the exact reason and the fixture
skips with it; CI installs the package through ``.ci/system-deps``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["MISSING", "CephMon", "free_port"]

_TOOLS = ("ceph-mon", "monmaptool", "ceph-authtool")
_missing = [t for t in _TOOLS if shutil.which(t) is None]
MISSING: str | None = (
    f"{', '.join(_missing)} not installed (apt-get install --no-install-recommends ceph-mon;"
    " .ci/system-deps does this in CI)" if _missing else None)

BANNER = b"ceph v2\n"


def require_ceph() -> None:
    """Skip the calling test with the exact reason when ceph-mon is missing, unless
    ASYNCMSGR_REQUIRE_CEPH=1 (set by .ci/run, where it must be installed): then fail."""
    if MISSING:
        import pytest
        if os.environ.get("ASYNCMSGR_REQUIRE_CEPH") == "1":
            pytest.fail(f"ASYNCMSGR_REQUIRE_CEPH=1 (set by .ci/run) but {MISSING}",
                        pytrace=False)
        pytest.skip(MISSING)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CephMon:
    """One mon named ``a`` listening on ``v2:127.0.0.1:port``."""

    def __init__(self, root: Path, port: int | None = None, auth: str = "none") -> None:
        self.root = root
        self.auth = auth
        self.port = port or free_port()
        self.fsid = uuid.uuid4()
        self.conf = root / "ceph.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"v2:127.0.0.1:{self.port}"

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon_host = {self.addr}
auth_cluster_required = {self.auth}
auth_service_required = {self.auth}
auth_client_required = {self.auth}
ms_bind_msgr1 = false
ms_bind_msgr2 = true
mon_data = {r}/mon.$id
run_dir = {r}/run
log_file = {r}/$name.log
admin_socket = {r}/run/$name.asok
keyring = {r}/keyring
mon_allow_pool_delete = true
# Health checks about the host, not the protocol: a test mon must report HEALTH_OK on a
# CI disk that is 70 % full (MON_DISK_LOW warns under 30 % free by default) and without
# cephx (the insecure global_id reclaim warning). Both appear only after the first
# health tick, so a fast run passed and a loaded one did not.
mon_data_avail_warn = 1
mon_warn_on_insecure_global_id_reclaim_allowed = false
[mon.a]
public_addr = {self.addr}
""")
        (r / "run").mkdir(exist_ok=True)

    def _run(self, *argv: str) -> None:
        res = subprocess.run(argv, capture_output=True, timeout=60, check=False)
        if res.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): "
                               f"{res.stderr.decode(errors='replace')[-2000:]}")

    def bootstrap(self) -> None:
        self._write_conf()
        monmap = self.root / "monmap"
        self._run("monmaptool", "--create", "--clobber", "--fsid", str(self.fsid), "--addv",
                  "a", f"[{self.addr}]", str(monmap))
        self._run("ceph-authtool", "--create-keyring", str(self.root / "keyring"),
                  "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        self._run("ceph-mon", "--mkfs", "-i", "a", "-c", str(self.conf), "--monmap",
                  str(monmap), "--keyring", str(self.root / "keyring"))

    def start(self, timeout: float = 30.0) -> None:
        if self.proc is not None:
            raise RuntimeError("mon already running")
        self.proc = subprocess.Popen(
            ["ceph-mon", "-f", "-i", "a", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=True)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Poll (bounded by ``timeout``) until the port answers with a msgr2 banner, then
        until ``ceph -s`` succeeds. The banner alone is too early: for a few ms after it
        the mon drops every AUTH_REQUEST, until its auth service has been through paxos."""
        deadline = time.monotonic() + timeout
        last = "no attempt"
        banner = False
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"ceph-mon exited with {self.proc.returncode} before it "
                                   f"was ready; see {self.root}/mon.a.log")
            try:
                if not banner:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                        s.settimeout(1.0)
                        banner = s.recv(len(BANNER)) == BANNER
                        last = "connected but no banner"
                if banner:
                    res = subprocess.run(
                        ["ceph", "-c", str(self.conf), "-n", "mon.", "--keyring",
                         str(self.root / "keyring"), "--connect-timeout", "5", "-s"],
                        capture_output=True, timeout=max(deadline - time.monotonic(), 1),
                        check=False)
                    if res.returncode == 0 and b"HEALTH_" in res.stdout:
                        return
                    last = f"ceph -s: {res.stderr.decode(errors='replace')[-300:]}"
            except (OSError, subprocess.TimeoutExpired) as exc:
                last = str(exc)
            time.sleep(0.02)  # polling a daemon for readiness, with a deadline
        raise RuntimeError(f"ceph-mon on port {self.port} not ready after {timeout}s: {last}")

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.root / "mon.a.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""


@contextmanager
def running_mon(root: Path, auth: str = "none") -> Iterator[CephMon]:
    """A bootstrapped, started mon under ``root``, stopped (by its pid) on exit; skips
    with the reason when ceph-mon is not installed (fails instead in CI)."""
    require_ceph()
    mon = CephMon(root, auth=auth)
    mon.bootstrap()
    mon.start()
    try:
        yield mon
    finally:
        mon.stop()
