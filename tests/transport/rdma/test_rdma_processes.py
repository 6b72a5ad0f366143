"""The ``rdma`` stack across processes: echo between processes, a killed peer, an
EventCenter server outliving killed clients, fd handoff to a worker, fork.

EMULATION: these run on the ``softverbs`` provider (shared memory), not on RDMA.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from tests.transport.rdma.support import (
    DEADLINE,
    LEN,
    Flow,
    echo_until_eof,
    fork_child,
    pump,
    raises,
    wait_readable,
)
from transport.rdma.stack import RdmaConnectedSocket, RdmaStack


def test_two_process_echo(tmpdir_path: str) -> None:
    """A client process sends length-prefixed messages; this process echoes them."""
    path = f"{tmpdir_path}/e.sock"
    s = RdmaStack("softverbs", chunk_size=8192, rx_chunks=8, tx_chunks=8)
    server = s.listen(path)

    def client_main() -> None:
        cs = RdmaStack("softverbs", chunk_size=8192, rx_chunks=8, tx_chunks=8)
        c = cs.connect(path)
        rng = random.Random(5)
        msgs = [rng.randbytes(rng.randint(1, 30000)) for _ in range(300)]
        f = Flow(c, b"".join(LEN.pack(len(m)) + m for m in msgs))
        want = len(f.data)
        pump([c], lambda: (f.step(), len(f.got) >= want)[1], 60)
        assert bytes(f.got) == bytes(f.data), "echo corrupted or reordered"
        c.close()
        cs.close()

    pid = fork_child(client_main)
    try:
        deadline = time.monotonic() + DEADLINE
        conn = server.accept()
        while conn is None:
            wait_readable([server.fileno()], deadline)
            conn = server.accept()
        echo_until_eof(conn, 60)
        conn.close()
    finally:
        _, status = os.waitpid(pid, 0)
        server.close()
        s.close()
    assert status == 0


def test_peer_process_killed_is_a_reset(tmpdir_path: str) -> None:
    """SIGKILL the peer mid-connection: buffered data is still read, then
    ConnectionResetError; writes raise BrokenPipeError."""
    path = f"{tmpdir_path}/k.sock"
    s = RdmaStack("softverbs", chunk_size=4096, rx_chunks=4, tx_chunks=4)
    server = s.listen(path)
    r, w = os.pipe()

    def client_main() -> None:
        os.close(w)
        cs = RdmaStack("softverbs", chunk_size=4096, rx_chunks=4, tx_chunks=4)
        c = cs.connect(path)
        f = Flow(c, b"ping" * 1000)
        pump([c], lambda: (f.step(), f.off == len(f.data))[1])
        os.read(r, 1)  # park until killed

    pid = fork_child(client_main)
    os.close(r)
    try:
        deadline = time.monotonic() + DEADLINE
        conn = server.accept()
        while conn is None:
            wait_readable([server.fileno()], deadline)
            conn = server.accept()
        f = Flow(conn, b"")
        pump([conn], lambda: (f.step(), len(f.got) >= 4000)[1])
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pid = 0
        buf = memoryview(bytearray(64))
        pump([conn], lambda: raises(lambda: conn.read_into(buf), ConnectionResetError))
        with pytest.raises(BrokenPipeError):
            conn.send([b"anyone?"])
        assert bytes(f.got) == b"ping" * 1000
        conn.close()
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(w)
        server.close()
        s.close()


def test_event_center_server_survives_killed_clients(tmpdir_path: str) -> None:
    """An echo server on the real EventCenter; four client processes, two of which are
    SIGKILLed mid-stream. The killed ones end in a reset, the others in an orderly EOF
    after every echo was verified, and the server keeps serving throughout."""
    from transport.event_center import READABLE, EventCenter

    path = f"{tmpdir_path}/ec.sock"
    s = RdmaStack("softverbs", chunk_size=4096, rx_chunks=4, tx_chunks=4)
    server = s.listen(path)
    center = EventCenter(name="rdma-test")
    outcomes: list[str] = []
    live: dict[int, RdmaConnectedSocket] = {}
    pids: dict[int, int] = {}  # ready-pipe fd -> child pid
    buf = memoryview(bytearray(65536))

    def serve(conn: RdmaConnectedSocket) -> None:
        pending = bytearray()
        fd = conn.fileno()

        def finish(how: str) -> None:
            outcomes.append(how)
            center.delete_file_event(fd, READABLE)
            del live[fd]
            conn.close()

        def on_readable(_: int) -> None:
            for _ in range(16):
                try:
                    n = conn.read_into(buf)
                except BlockingIOError:
                    break
                except ConnectionResetError:
                    return finish("reset")
                if n == 0:
                    return finish("eof")
                pending.extend(buf[:n])
            while pending:
                try:
                    del pending[: conn.send([bytes(pending[:65536])])]
                except BlockingIOError:
                    break
                except BrokenPipeError:
                    return finish("reset")

        live[fd] = conn
        center.create_file_event(fd, READABLE, on_readable)

    def on_accept(_: int) -> None:
        while (c := server.accept()) is not None:
            serve(c)

    def on_ready(fd: int) -> None:  # a victim reached its mark: kill it mid-stream
        center.delete_file_event(fd, READABLE)
        os.kill(pids[fd], signal.SIGKILL)

    def client_main(idx: int, wfd: int) -> None:
        cs = RdmaStack("softverbs", chunk_size=4096, rx_chunks=4, tx_chunks=4)
        c = cs.connect(path)
        rng = random.Random(idx)
        rounds = 0
        while True:
            msg = rng.randbytes(rng.randint(1, 20000))
            f = Flow(c, LEN.pack(len(msg)) + msg)
            pump([c], lambda: (f.step(), len(f.got) >= len(f.data))[1])
            assert bytes(f.got) == bytes(f.data)
            rounds += 1
            if rounds == 20:
                if wfd < 0:
                    break
                os.write(wfd, b"k")  # and keep going until the SIGKILL lands
        c.close()
        cs.close()

    children: list[int] = []
    center.create_file_event(server.fileno(), READABLE, on_accept)
    try:
        for idx in range(4):
            victim = idx >= 2
            r, w = os.pipe() if victim else (-1, -1)
            pid = fork_child(lambda: client_main(idx, w))
            children.append(pid)
            if victim:
                os.close(w)
                pids[r] = pid
                center.create_file_event(r, READABLE, on_ready)
        deadline = time.monotonic() + 60
        while len(outcomes) < 4:
            assert time.monotonic() < deadline, f"outcomes so far: {outcomes}"
            center.process_events(0.1)
        assert sorted(outcomes) == ["eof", "eof", "reset", "reset"]
    finally:
        statuses = [os.waitpid(pid, 0)[1] for pid in children]
        for fd in pids:
            os.close(fd)
        for conn in list(live.values()):
            conn.close()
        center.close()
        server.close()
        s.close()
    assert statuses[:2] == [0, 0]
    assert all(os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL for st in statuses[2:])


def _mappings() -> int:
    """Our memfd mappings in this process (memfd names show up in /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "amsgr-soft" in line)


def test_closed_connections_leave_no_mappings(tmpdir_path: str) -> None:
    """no_leaks counts fds; mappings outlive their fds, so count those too."""
    s = RdmaStack("softverbs", chunk_size=4096, rx_chunks=4, tx_chunks=4)
    before = _mappings()
    server = s.listen(f"{tmpdir_path}/m.sock")
    for _ in range(10):
        client = s.connect(server.address)
        deadline = time.monotonic() + DEADLINE
        conn = server.accept()
        while conn is None:
            wait_readable([server.fileno()], deadline)
            conn = server.accept()
        a, b = Flow(client, b"x" * 10000), Flow(conn, b"y" * 10000)
        pump([client, conn], lambda: (a.step(), b.step(), len(a.got) == len(b.got) == 10000)[2])
        assert _mappings() > before
        conn.close()
        client.close()
    server.close()
    s.close()
    assert _mappings() == before


def test_processor_hands_the_side_channel_to_a_worker_process(tmpdir_path: str) -> None:
    """The pool's processor mode: this process accepts the side channel and passes the
    fd by SCM_RIGHTS to a worker process, which adopts it and echoes."""
    import socket as _socket

    from transport.fdpass import recv_fds, send_fds, seqpacket_pair

    path = f"{tmpdir_path}/proc.sock"
    ctl, worker_ctl = seqpacket_pair()

    def worker_main() -> None:
        ctl.close()
        _, fds = recv_fds(worker_ctl, 16, 1)
        ws = RdmaStack("softverbs", chunk_size=4096, rx_chunks=4, tx_chunks=4)
        conn = ws.adopt(_socket.socket(fileno=fds[0]))
        echo_until_eof(conn)
        conn.close()
        ws.close()

    lsock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    lsock.bind(path)
    lsock.listen(4)
    pid = fork_child(worker_main)
    worker_ctl.close()
    s = RdmaStack("softverbs", chunk_size=4096, rx_chunks=4, tx_chunks=4)
    try:
        client = s.connect(path)
        raw, _ = lsock.accept()
        send_fds(ctl, b"conn", [raw.fileno()])
        raw.close()  # the worker owns it now
        data = random.Random(3).randbytes(200_000)
        f = Flow(client, data)
        pump([client], lambda: (f.step(), len(f.got) == len(data))[1])
        assert bytes(f.got) == data
        client.close()
    finally:
        _, status = os.waitpid(pid, 0)
        ctl.close()
        lsock.close()
        os.unlink(path)
        s.close()
    assert status == 0


def test_forked_worker_opens_its_own_device(stack: RdmaStack) -> None:
    parent_dev = stack.device

    def child() -> None:
        assert stack.device is not parent_dev  # verbs resources do not survive fork
        stack.close()  # closes only the child's device

    pid = fork_child(child)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and stack.device is parent_dev
