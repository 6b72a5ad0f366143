"""Shared fixtures. The autouse ``no_leaks`` fixture fails any test that leaves behind a
child process, an open fd, or a shared-memory segment of this test session."""

from __future__ import annotations

import gc
import os
import signal
import time
from collections.abc import Iterator

import pytest

# Segments created by this test session carry their own prefix, so concurrent runs on
# the same machine never see each other's segments as leaks.
os.environ.setdefault("ASYNCMSGR_SHM_PREFIX", f"amsgrt{os.getpid()}")

from tests import fuzzing  # noqa: E402,F401  (loads the hypothesis profile)
from transport import shmname  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop comes with the bench extra
    pass
else:
    # libuv opens one pipe pair per process at its first loop (uv__signal_global_once_init,
    # its signal lock) and keeps it for the life of the process: open it before any test
    # counts fds, or the first test that makes a uvloop loop would be blamed for it.
    uvloop.new_event_loop().close()


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return out


def _children() -> list[int]:
    me = os.getpid()
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the ")" that closes the command name.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me:
            kids.append(int(entry))
    return kids


def _reap(pids: list[int], deadline: float) -> list[int]:
    """Wait (bounded) for the given children to exit; return those still there."""
    left = list(pids)
    while left and time.monotonic() < deadline:
        still = []
        for pid in left:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid  # not ours to wait for (multiprocess reaped it) and gone soon
                if os.path.exists(f"/proc/{pid}"):
                    done = 0
            if done == 0:
                still.append(pid)
        left = still
        if left:
            time.sleep(0.02)  # polling the kernel for exit, not synchronising with our code
    return left


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    gc.collect()
    fds_before = _fds()
    kids_before = set(_children())
    shm_before = set(shmname.list_segments())
    yield
    problems = []
    leftover = [p for p in _children() if p not in kids_before]
    if leftover:
        still = _reap(leftover, time.monotonic() + 5.0)
        for pid in still:
            os.kill(pid, signal.SIGKILL)
        _reap(still, time.monotonic() + 5.0)
        if still:
            problems.append(f"child processes left running: {still}")
    gc.collect()
    new_fds = {fd: t for fd, t in _fds().items() if fd not in fds_before or fds_before[fd] != t}
    if new_fds:
        problems.append(f"fds left open: {new_fds}")
    new_shm = sorted(set(shmname.list_segments()) - shm_before)
    for name in new_shm:
        try:
            os.unlink(shmname.SHM_DIR + name)
        except FileNotFoundError:
            pass
    if new_shm:
        problems.append(f"shared memory segments left in /dev/shm: {new_shm}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_leaks: skip the no_leaks check (justify in the test)")
