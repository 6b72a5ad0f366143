"""The reliable byte stream over memif (transport.memif.stream) and MemifStack.

The conformance suite (tests/conformance, factories memif-fs/-abstract/-poll) covers the
ConnectedSocket contract; here: loss recovery (memif is lossy), the two-process case,
a peer killed with SIGKILL, and the window bound.
"""

from __future__ import annotations

import os
import select
import signal
import time

import pytest

from transport.event_center import READABLE, EventCenter
from transport.memif import MemifConfig, MemifStack, MemifStream, StackConfig

from .test_memif_support import fork_peer, wait_child


def _pair(stack: MemifStack, addr: str) -> tuple:
    server = stack.listen(addr)
    client = stack.connect(addr)
    assert client.is_connected() == 1
    deadline = time.monotonic() + 5
    conn = None
    while conn is None:
        assert time.monotonic() < deadline
        select.select([server.fileno()], [], [], 0.05)
        conn = server.accept()
    return server, client, conn


def _transfer(src: MemifStream, dst: MemifStream, data: bytes, timeout: float = 30.0) -> bytes:
    got = bytearray()
    buf = memoryview(bytearray(1 << 16))
    sent = 0
    deadline = time.monotonic() + timeout
    while len(got) < len(data):
        assert time.monotonic() < deadline, f"stalled at {len(got)}/{len(data)}"
        if sent < len(data):
            try:
                sent += src.send([memoryview(data)[sent:sent + (1 << 16)]])
            except BlockingIOError:
                pass
        elif src is not dst:
            # The sender must keep servicing its socket (acks, retransmit timer) as a
            # worker does on READABLE; it receives nothing here.
            try:
                assert src.read_into(buf) == 0, "unexpected data from the receiver"
            except BlockingIOError:
                pass
        try:
            n = dst.read_into(buf)
            got += buf[:n]
        except BlockingIOError:
            select.select([src.fileno(), dst.fileno()], [], [], 0.05)
    return bytes(got)


@pytest.mark.parametrize("drop_every", [50, 9])
def test_lost_frames_are_retransmitted(drop_every: int) -> None:
    """Drop every Nth DATA frame at the receiver (as a full DPDK ring would): the stream
    still delivers every byte in order, and the sender did retransmit."""
    stack = MemifStack(StackConfig(memif=MemifConfig(hugepages=False)))
    server, client, conn = _pair(stack, f"@amsgr-loss-{os.getpid()}-{drop_every}")
    try:
        conn._drop_every = drop_every
        data = os.urandom(2 << 20)
        assert _transfer(client, conn, data) == data
        assert conn._drops > 0 and client.retransmits > 0
    finally:
        client.close()
        conn.close()
        server.close()


def test_window_never_exceeds_half_the_ring() -> None:
    stack = MemifStack(StackConfig(memif=MemifConfig(log2_ring_size=8, hugepages=False)))
    server, client, conn = _pair(stack, f"@amsgr-win-{os.getpid()}")
    try:
        total = 0
        with pytest.raises(BlockingIOError):
            for _ in range(1000):  # the peer never reads: credit runs out
                total += client.send([bytes(1 << 16)])
        assert client._window <= 256 // 2
        assert total <= client._window * client._mss
        assert client.iface is not None and client.iface.tx_rings[0].in_flight() <= 128
    finally:
        client.close()
        conn.close()
        server.close()


def _wait_ring_readable(sock: MemifStream) -> None:
    """Until frames sit in ``sock``'s rx ring (interrupt mode: the peer kicked it)."""
    assert sock.iface is not None
    deadline = time.monotonic() + 10
    while not select.select([sock.iface.fileno(0)], [], [], 0.05)[0]:
        assert time.monotonic() < deadline, "no frames arrived"


def test_in_order_data_is_copied_once_into_the_readers_buffer() -> None:
    """read_into copies segments straight from the ring into the caller's buffer, with
    no intermediate bytes object per segment. Holding each segment as bytes first (the
    old path) peaked at 55 KB of allocations for these 48 KiB; the direct path stays
    well under one segment."""
    import tracemalloc

    stack = MemifStack(StackConfig(memif=MemifConfig(hugepages=False)))
    server, client, conn = _pair(stack, f"@amsgr-copy-{os.getpid()}")
    try:
        data = os.urandom(48 * 1024)  # a few segments: mss is just under 16 KiB
        assert client.send([data]) == len(data)
        _wait_ring_readable(conn)
        buf = memoryview(bytearray(256 * 1024))
        tracemalloc.start()
        try:
            n = conn.read_into(buf)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert n == len(data) and bytes(buf[:n]) == data
        assert peak < 24 * 1024, f"read_into allocated {peak} bytes moving {n}"
        # A reader buffer smaller than a segment: the rest waits in order for the next read.
        more = os.urandom(40 * 1024)
        assert client.send([more]) == len(more)
        _wait_ring_readable(conn)
        small = memoryview(bytearray(1000))
        got = bytearray()
        deadline = time.monotonic() + 10
        while len(got) < len(more):
            assert time.monotonic() < deadline
            try:
                got += small[:conn.read_into(small)]
            except BlockingIOError:
                select.select([conn.fileno()], [], [], 0.05)
        assert bytes(got) == more
    finally:
        client.close()
        conn.close()
        server.close()


def _echo_child(addr: str, ready_fd: int) -> None:
    """Child: a MemifStack server echoing one connection's bytes until EOF."""
    stack = MemifStack(StackConfig(memif=MemifConfig(hugepages=False)))
    center = EventCenter()
    server = stack.listen(addr)
    os.write(ready_fd, b"r")  # listening: the parent may connect now
    conns: list = []
    buf = memoryview(bytearray(1 << 16))
    out = bytearray()
    done: list[bool] = []

    def on_conn(_: int) -> None:
        # echo: send what is pending, read what is there, repeat until neither moves;
        # EOF ends the run
        c = conns[0]
        while True:
            while out:
                try:
                    n = c.send([bytes(out[: 1 << 16])])
                except BlockingIOError:
                    break
                del out[:n]
            if len(out) >= (4 << 20):
                return  # peer must read first; its acks wake us
            try:
                n = c.read_into(buf)
            except BlockingIOError:
                return
            if n == 0:
                done.append(True)
                return
            out.extend(buf[:n])

    def on_accept(_: int) -> None:
        c = server.accept()
        if c is not None:
            conns.append(c)
            center.create_file_event(c.fileno(), READABLE, on_conn)

    center.create_file_event(server.fileno(), READABLE, on_accept)
    deadline = time.monotonic() + 30
    while not done and time.monotonic() < deadline:
        center.process_events(0.05)
    for c in conns:
        center.delete_file_event(c.fileno(), READABLE)
        c.close()
    center.delete_file_event(server.fileno(), READABLE)
    server.close()
    center.close()
    if not done:
        raise TimeoutError("no EOF from the client")


def test_two_processes_echo_stream(tmp_path) -> None:
    addr = str(tmp_path / "stream.sock")
    # Signal readiness through a pipe so we never connect before the child listens.
    r, w = os.pipe()
    pid = fork_peer(lambda: (os.close(r), _echo_child(addr, w)))
    os.close(w)
    try:
        assert select.select([r], [], [], 10)[0], "child never listened"
        os.read(r, 1)
        stack = MemifStack(StackConfig(memif=MemifConfig(hugepages=False)))
        client = stack.connect(addr)
        try:
            data = os.urandom(3 << 20)
            assert _transfer(client, client, data) == data  # echoed back through the child
            client.shutdown()
        finally:
            client.close()
    finally:
        os.close(r)
        assert wait_child(pid) == 0


def test_peer_killed_is_a_reset_not_eof(tmp_path) -> None:
    addr = str(tmp_path / "kill.sock")
    r, w = os.pipe()
    pid = fork_peer(lambda: (os.close(r), _echo_child(addr, w)))
    os.close(w)
    try:
        assert select.select([r], [], [], 10)[0]
        stack = MemifStack(StackConfig(memif=MemifConfig(hugepages=False)))
        client = stack.connect(addr)
        try:
            assert _transfer(client, client, b"ping" * 1000) == b"ping" * 1000
            os.kill(pid, signal.SIGKILL)
            assert wait_child(pid) == -signal.SIGKILL
            buf = memoryview(bytearray(100))
            deadline = time.monotonic() + 5
            with pytest.raises(ConnectionResetError):
                while time.monotonic() < deadline:
                    select.select([client.fileno()], [], [], 0.1)
                    try:
                        client.read_into(buf)
                    except BlockingIOError:
                        pass
        finally:
            client.close()
    finally:
        os.close(r)


def test_refused_handshake_surfaces_as_connection_refused() -> None:
    """Our listener serves only id 0 via the stack; a client asking id 5 is refused."""
    from transport.memif import MemifListener
    addr = f"@amsgr-refstack-{os.getpid()}"
    with MemifListener(addr, ids={0}) as lst:
        stack = MemifStack(StackConfig(memif=MemifConfig(id=5, hugepages=False)))
        client = stack.connect(addr)
        try:
            deadline = time.monotonic() + 5
            with pytest.raises(ConnectionRefusedError, match="ID not found"):
                while time.monotonic() < deadline:
                    lst.accept()
                    select.select([client.fileno()], [], [], 0.05)
                    try:
                        client.send([b"x"])
                    except BlockingIOError:
                        pass
        finally:
            client.close()


def _echo_stream(sock: MemifStream, deadline: float) -> None:
    """Echo bytes on ``sock`` until EOF (select-driven, as a worker's loop would be)."""
    buf = memoryview(bytearray(1 << 16))
    out = bytearray()
    while time.monotonic() < deadline:
        select.select([sock.fileno()], [], [], 0.05)
        while out:
            try:
                n = sock.send([bytes(out[: 1 << 16])])
            except BlockingIOError:
                break
            del out[:n]
        try:
            n = sock.read_into(buf)
        except BlockingIOError:
            continue
        if n == 0:
            return
        out.extend(buf[:n])
    raise TimeoutError("no EOF")


def test_server_connection_handed_to_another_process() -> None:
    """Handoff (the pool's Processor → worker, or a retiring worker): export a live
    server-side connection with unread data, adopt it in a child, keep streaming."""
    import pickle
    import socket

    stack = MemifStack(StackConfig(memif=MemifConfig(hugepages=False)))
    server, client, conn = _pair(stack, f"@amsgr-handoff-{os.getpid()}")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def child() -> None:
        a.close()
        msg, fds, _, _ = socket.recv_fds(b, 1 << 20, 64)
        adopted = MemifStream.adopt(pickle.loads(msg), fds)
        try:
            _echo_stream(adopted, time.monotonic() + 20)
        finally:
            adopted.close()

    pid = fork_peer(child)
    b.close()
    try:
        first = os.urandom(100_000)
        assert _transfer(client, conn, first[:50_000]) == first[:50_000]  # served here
        sent = 0  # then bytes the old owner takes in but never reads: they must travel
        while sent < len(first) - 50_000:
            try:
                sent += client.send([first[50_000 + sent:]])
            except BlockingIOError:
                select.select([client.fileno()], [], [], 0.05)
        meta, fds = conn.export()
        socket.send_fds(a, [pickle.dumps(meta)], fds)
        for fd in fds:
            os.close(fd)
        rest = os.urandom(1 << 20)
        want = first[50_000:] + rest  # the unread bytes first, echoed by the new owner
        got = bytearray()
        buf = memoryview(bytearray(1 << 16))
        sent = 0
        deadline = time.monotonic() + 20
        while len(got) < len(want):
            assert time.monotonic() < deadline, f"{len(got)}/{len(want)} echoed"
            if sent < len(rest):
                try:
                    sent += client.send([memoryview(rest)[sent:sent + (1 << 16)]])
                except BlockingIOError:
                    pass
            try:
                n = client.read_into(buf)
                got += buf[:n]
            except BlockingIOError:
                select.select([client.fileno()], [], [], 0.05)
        assert got == want
        client.shutdown()
        assert wait_child(pid) == 0
    finally:
        a.close()
        client.close()
        server.close()


def test_poll_mode_moves_messages_without_eventfd_or_timerfd_syscalls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Poll mode reports readiness in user space (EventCenter.fire_file_event): a
    request/reply exchange writes no eventfd (no kick, no private wake-up) and arms no
    timerfd; the delayed ACK and RTO deadlines are checked by the poller instead."""
    from transport.memif import stream as stream_mod

    center = EventCenter()
    stack = MemifStack(StackConfig(memif=MemifConfig(interrupt=False, hugepages=False)))
    stack.bind_center(center)
    server, client, conn = _pair(stack, f"@amsgr-pollfire-{os.getpid()}")
    buf = memoryview(bytearray(1 << 16))
    got: dict[str, bytearray] = {"server": bytearray(), "client": bytearray()}

    def reader(sock: MemifStream, name: str, echo: bool):
        def on_readable(_: int) -> None:
            while True:
                try:
                    n = sock.read_into(buf)
                except BlockingIOError:
                    return
                if n == 0:
                    return
                got[name] += buf[:n]
                if echo:
                    sock.send([bytes(buf[:n])])
        return on_readable

    center.create_file_event(conn.fileno(), READABLE, reader(conn, "server", True))
    center.create_file_event(client.fileno(), READABLE, reader(client, "client", False))

    def pump_until(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(got["client"]) < n:
            assert time.monotonic() < deadline, f"stalled at {len(got['client'])}/{n}"
            center.process_events(0.01)

    try:
        client.send([b"warm-up!"])  # finishes the client's lazy handshake first
        pump_until(8)
        writes: list[int] = []
        arms: list[float] = []
        real_write = os.eventfd_write
        monkeypatch.setattr(stream_mod.os, "eventfd_write",
                            lambda fd, v: (writes.append(fd), real_write(fd, v))[1])
        monkeypatch.setattr(stream_mod.TimerFd, "arm", lambda self, d: arms.append(d))
        total = 8
        for i in range(200):
            msg = b"request %05d" % i
            client.send([msg])
            total += len(msg)
            pump_until(total)
        assert bytes(got["client"][8:]) == b"".join(b"request %05d" % i for i in range(200))
        assert writes == []
        assert arms == []
    finally:
        for s in (conn, client):
            center.delete_file_event(s.fileno(), READABLE)
            s.close()
        server.close()
        center.close()
