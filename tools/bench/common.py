"""Process plumbing every bench needs: forked servers and clients, their CPU time."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

import msgpack

from tools.common import percentile

__all__ = ["ForkedCall", "fork_child", "fork_server", "latency_us", "proc_cpu", "proc_hwm_kb"]


def fork_child(body: Callable[[int], int]) -> tuple[int, int]:
    """Fork; the child runs ``body(write_fd)`` and exits with what it returns (1, after
    printing the traceback, if it raises: it must never return into the parent's
    stack). The parent gets ``(pid, read_fd)``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        code = 1
        try:
            code = body(w)
        except BaseException:  # noqa: BLE001 - report anything, then exit
            traceback.print_exc()
        os._exit(code)
    os.close(w)
    return pid, r


def fork_server(serve: Callable[[Callable[[], None]], None], what: str) -> int:
    """Run ``serve(ready)`` in a forked child; return its pid once it called ``ready()``
    (stop it with SIGTERM and reap it)."""

    def body(w: int) -> int:
        def ready() -> None:
            os.write(w, b"1")
            os.close(w)
        serve(ready)
        return 0

    pid, r = fork_child(body)
    ok = os.read(r, 1)  # blocks until the server is listening (or died)
    os.close(r)
    if ok != b"1":
        os.waitpid(pid, 0)
        raise RuntimeError(f"{what} failed to start")
    return pid


class ForkedCall:
    """Run ``fn()`` in a forked child process; ``result()`` waits for its (msgpack-able)
    return value. Several can run at once: start them all, then collect."""

    def __init__(self, fn: Callable[[], Any], what: str) -> None:
        def body(w: int) -> int:
            data = msgpack.packb(fn())
            with os.fdopen(w, "wb") as f:
                f.write(data)
            return 0

        self.pid, self.fd = fork_child(body)
        self.what = what

    def result(self) -> Any:
        with os.fdopen(self.fd, "rb") as f:
            data = f.read()
        _, status = os.waitpid(self.pid, 0)
        if status != 0 or not data:
            raise RuntimeError(f"{self.what} failed")
        return msgpack.unpackb(data)


def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def proc_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def latency_us(values_ns: list[int], q: float) -> float:
    """Latency quantile in µs (``values_ns`` in ns; 0 when there are none)."""
    return percentile(values_ns, q, 0.0) / 1000.0
