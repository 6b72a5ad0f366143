"""Shared helpers for the memif tests (no tests here): a forked echo peer, hugepages."""

from __future__ import annotations

import os
import select
import signal
import time
import traceback
from collections.abc import Callable

from transport.hugepages import reserved_hugepages  # noqa: F401 - re-exported for the tests
from transport.memif import MemifConfig, MemifDisconnected, MemifInterface, MemifListener

def echo_loop(iface: MemifInterface, deadline: float) -> int:
    """Return every frame on the queue it came in on until the peer disconnects."""
    fds = [iface.fileno(q) for q in range(iface.queues)] + [iface.ctrl_fileno()]
    echoed = 0
    pending: list[list[bytes]] = [[] for _ in range(iface.queues)]
    while time.monotonic() < deadline:
        if iface.interrupt and not any(pending):
            select.select(fds, [], [], 0.2)
        try:
            iface.poll_control()
        except MemifDisconnected:
            return echoed
        for q in range(iface.queues):
            if iface.interrupt:
                iface.clear_interrupt(q)
            got = iface.rx_burst(256, q)
            if got:
                pending[q] += [bytes(f) for f in got]
                iface.rx_release(q)
            if pending[q]:
                n = iface.tx_burst(pending[q], q)
                del pending[q][:n]
                echoed += n
    raise TimeoutError("echo peer ran past its deadline")


def fork_peer(body: Callable[[], int | None]) -> int:
    """Run ``body`` in a forked child; exit status 0 if it returned, 1 if it raised."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_child(pid: int, timeout: float = 20.0) -> int:
    """Exit status of ``pid``; SIGKILL and fail after ``timeout`` (polls the kernel)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError(f"child {pid} did not exit in {timeout}s")


def echo_server(addr: str, config: MemifConfig, ready_fd: int | None = None,
                clients: int = 1) -> Callable[[], None]:
    """Body of a child that serves ``clients`` memif clients one after another, echoing."""

    def body() -> None:
        with MemifListener(addr, config) as lst:
            if ready_fd is not None:
                os.write(ready_fd, b"r")
                os.close(ready_fd)
            for _ in range(clients):
                iface = lst.accept_blocking(15.0)
                with iface:
                    echo_loop(iface, time.monotonic() + 30.0)

    return body
