"""The ``rdma`` stack beyond the conformance suite: credits, peer death, close races.

EMULATION: these run on the ``softverbs`` provider (shared memory), not on RDMA.
"""

from __future__ import annotations

import os
import random
import select
import signal
import struct
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator

import pytest

from transport.rdma.stack import RdmaConnectedSocket, RdmaServerSocket, RdmaStack
from transport.stack import ConnectedSocket

DEADLINE = 20.0


@pytest.fixture
def tmpdir_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="amsgr-rdma-t-")
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


@pytest.fixture
def stack() -> Iterator[RdmaStack]:
    s = RdmaStack("softverbs", chunk_size=4096, rx_chunks=8, tx_chunks=8)
    yield s
    s.close()


def wait_readable(fds: list[int], deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise AssertionError("deadline passed")
    select.select(fds, [], [], left)


def establish(stack: RdmaStack, path: str) -> tuple[RdmaServerSocket, RdmaConnectedSocket, RdmaConnectedSocket]:
    server = stack.listen(path)
    client = stack.connect(path)
    assert client.is_connected() == 1
    deadline = time.monotonic() + DEADLINE
    conn = server.accept()
    while conn is None:
        wait_readable([server.fileno()], deadline)
        conn = server.accept()
    return server, client, conn


def pump(socks: list[ConnectedSocket], step: Callable[[], bool], limit: float = DEADLINE) -> None:
    """Call ``step`` whenever one of the sockets is readable until it returns True."""
    deadline = time.monotonic() + limit
    while not step():
        wait_readable([s.fileno() for s in socks], deadline)


class Flow:
    """Sends ``data`` on ``sock`` and collects what arrives, non-blocking."""

    def __init__(self, sock: ConnectedSocket, data: bytes, read_size: int = 65536) -> None:
        self.sock, self.data, self.off = sock, memoryview(data), 0
        self.got = bytearray()
        self.buf = memoryview(bytearray(read_size))
        self.eof = False

    def step(self) -> None:
        while self.off < len(self.data):  # until the stack pushes back
            try:
                self.off += self.sock.send([self.data[self.off: self.off + 50000]])
            except BlockingIOError:
                break
        while not self.eof:
            try:
                n = self.sock.read_into(self.buf)
            except BlockingIOError:
                break
            if n == 0:
                self.eof = True
            self.got += self.buf[:n]


def test_labels_say_emulation(stack: RdmaStack, tmpdir_path: str) -> None:
    assert stack.name == "rdma" and stack.emulated and stack.provider.name == "softverbs"
    server, client, conn = establish(stack, f"{tmpdir_path}/l.sock")
    assert client.provider_emulated and client.write_fileno() is None
    client.close()
    conn.close()
    server.close()


@pytest.mark.parametrize("rx_chunks,chunk", [(2, 256), (3, 100), (8, 4096)])
def test_credits_keep_receiver_ready_both_ways(tmpdir_path: str, rx_chunks: int, chunk: int) -> None:
    """Tiny windows, both directions at once, a reader taking odd sizes: every byte
    arrives in order and the emulated NIC never saw receiver-not-ready."""
    s = RdmaStack("softverbs", chunk_size=chunk, rx_chunks=rx_chunks, tx_chunks=2)
    try:
        server, client, conn = establish(s, f"{tmpdir_path}/c.sock")
        rng = random.Random(rx_chunks)
        a = Flow(client, rng.randbytes(300_000), read_size=777)
        b = Flow(conn, rng.randbytes(250_000), read_size=4093)

        def step() -> bool:
            a.step()
            b.step()
            return len(a.got) == len(b.data) and len(b.got) == len(a.data)

        pump([client, conn], step)
        assert bytes(a.got) == bytes(b.data) and bytes(b.got) == bytes(a.data)
        assert s.device.stats["rnr"] == 0, "credits let a sender meet receiver-not-ready"  # type: ignore[attr-defined]
        for c in (client, conn):  # every send completion gave its chunk back
            assert len(c._tx_free) == 2 and len(c._ctrl_free) == 2 * RdmaStack.CTRL_SLOTS + 2
        client.close()
        conn.close()
        server.close()
    finally:
        s.close()


def test_shutdown_semantics(stack: RdmaStack, tmpdir_path: str) -> None:
    server, client, conn = establish(stack, f"{tmpdir_path}/s.sock")
    b = Flow(conn, b"")
    client.send([b"abc"])
    client.shutdown()
    with pytest.raises(BrokenPipeError):
        client.send([b"more"])
    assert client.read_into(memoryview(bytearray(10))) == 0
    pump([conn], lambda: (b.step(), b.eof)[1])
    assert bytes(b.got) == b"abc"
    client.close()
    # The peer closed: writes fail like on a closed TCP peer, reads keep saying EOF.
    pump([conn], lambda: _raises(lambda: conn.send([b"x"]), BrokenPipeError))
    assert conn.read_into(memoryview(bytearray(10))) == 0
    conn.close()
    server.close()


def _raises(fn: Callable[[], object], exc: type[BaseException]) -> bool:
    try:
        fn()
    except exc:
        return True
    except BlockingIOError:
        return False
    return False


def test_peer_close_while_sender_is_blocked_on_credits(stack: RdmaStack, tmpdir_path: str) -> None:
    server, client, conn = establish(stack, f"{tmpdir_path}/b.sock")
    sent = 0
    with pytest.raises(BlockingIOError):
        for _ in range(1000):
            sent += client.send([bytes(4096)])
    assert sent > 0
    conn.close()  # the receiver goes away with our data unread
    pump([client], lambda: _raises(lambda: client.send([b"x"]), BrokenPipeError))
    client.close()
    server.close()


def test_close_before_accept_and_listener_close_with_pending(stack: RdmaStack, tmpdir_path: str) -> None:
    path = f"{tmpdir_path}/p.sock"
    server = stack.listen(path)
    early = stack.connect(path)
    early.close()  # HELLO sent, then gone before the server looked
    pending = stack.connect(path)
    deadline = time.monotonic() + DEADLINE
    got: list[RdmaConnectedSocket] = []
    while time.monotonic() < deadline and not got:
        c = server.accept()
        if c is not None:
            got.append(c)
        else:
            wait_readable([server.fileno()], deadline)
    for c in got:  # at most the live one; the dead one may have failed its handshake
        c.close()
    # A client whose listener closes before answering sees a reset, not a hang.
    late = stack.connect(path)
    server.close()
    buf = memoryview(bytearray(16))
    pump([late], lambda: _raises(lambda: late.read_into(buf), ConnectionResetError))
    late.close()
    pending.close()
    assert not os.path.exists(path)


def test_concurrent_close_with_data_in_flight(stack: RdmaStack, tmpdir_path: str) -> None:
    for order in ("client-first", "server-first"):
        server, client, conn = establish(stack, f"{tmpdir_path}/{order}.sock")
        for s in (client, conn):
            try:
                s.send([bytes(20000)])
            except BlockingIOError:
                pass
        first, second = (client, conn) if order == "client-first" else (conn, client)
        first.close()
        try:
            second.send([b"late"])
        except (BlockingIOError, BrokenPipeError):
            pass
        second.close()
        second.close()
        server.close()
    assert not stack._conns


def test_stack_close_closes_everything(tmpdir_path: str) -> None:
    s = RdmaStack("softverbs", chunk_size=4096, rx_chunks=4, tx_chunks=4)
    server, client, _conn = establish(s, f"{tmpdir_path}/x.sock")
    client.send([b"data"])
    s.close()  # both connections; no fd may leak (no_leaks checks)
    server.close()
    with pytest.raises(OSError):
        client.send([b"after close"])


# -- two processes ---------------------------------------------------------------------------------

def _fork(fn: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


_LEN = struct.Struct("!I")


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
        f = Flow(c, b"".join(_LEN.pack(len(m)) + m for m in msgs))
        want = len(f.data)
        pump([c], lambda: (f.step(), len(f.got) >= want)[1], 60)
        assert bytes(f.got) == bytes(f.data), "echo corrupted or reordered"
        c.close()
        cs.close()

    pid = _fork(client_main)
    try:
        deadline = time.monotonic() + DEADLINE
        conn = server.accept()
        while conn is None:
            wait_readable([server.fileno()], deadline)
            conn = server.accept()
        echo = Flow(conn, b"")
        pending = bytearray()

        def step() -> bool:
            echo.step()
            pending.extend(echo.got)
            echo.got.clear()
            while pending:
                try:
                    del pending[: conn.send([bytes(pending[:65536])])]
                except (BlockingIOError, BrokenPipeError):
                    break
            return echo.eof

        pump([conn], step, 60)
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

    pid = _fork(client_main)
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
        pump([conn], lambda: _raises(lambda: conn.read_into(buf), ConnectionResetError))
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


def test_adopt_a_side_channel_accepted_elsewhere(stack: RdmaStack, tmpdir_path: str) -> None:
    """Processor mode: a plain Unix listener accepts, the fd travels (here: stays) and a
    worker adopts it; the handshake runs on the adopting side's readiness."""
    import socket as _socket
    path = f"{tmpdir_path}/a.sock"
    lsock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    lsock.bind(path)
    lsock.listen(4)
    try:
        client = stack.connect(path)
        raw, _ = lsock.accept()
        conn = stack.adopt(raw)
        assert conn.is_connected() == 1
        a, b = Flow(client, b"via the processor"), Flow(conn, b"and back")
        pump([client, conn], lambda: (a.step(), b.step(), len(b.got) == 17 and len(a.got) == 8)[2])
        assert bytes(b.got) == b"via the processor" and bytes(a.got) == b"and back"
        client.close()
        conn.close()
    finally:
        lsock.close()
        os.unlink(path)


def test_softverbs_needs_a_unix_side_channel(stack: RdmaStack) -> None:
    with pytest.raises(OSError) as info:
        stack.listen(("127.0.0.1", 0))
    assert "Unix socket" in str(info.value)
    with pytest.raises(OSError):
        stack.connect(("127.0.0.1", 9))


def test_tcp_side_channel_framing() -> None:
    """The TCP side channel (pyverbs only) frames messages with a length prefix and
    reassembles them from arbitrary splits."""
    import socket as _socket

    from transport.rdma.sidechannel import SideChannel as _Side
    a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)  # a stream, like TCP
    sa, sb = _Side(a), _Side(b)
    assert not sa.seqpacket and not sb.seqpacket
    b.setblocking(False)
    try:
        assert sb.recv() is None
        sa.send(b'{"x": 1}')
        sa.send(b"second")
        assert sb.recv() == (b'{"x": 1}', [])
        assert sb.recv() == (b"second", [])
        a.sendall(struct.pack("!I", 5) + b"par")  # split mid-message
        assert sb.recv() is None
        a.sendall(b"ts")
        assert sb.recv() == (b"parts", [])
        with pytest.raises(OSError):
            sa.send(b"fds?", [0])
        a.close()
        assert sb.recv() == (b"", [])
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("garbage", [b"\x00", b"not json", b'{"m": "amsgr-rdma/1", "kind": "hello"}',
                                     (b'{"m": "amsgr-rdma/1", "kind": "hello", "verbs": {"provider": "softverbs"},'
                                      b' "credits": 4, "chunk": 4096}'),
                                     b'{"m": "amsgr-rdma/1", "kind": "ack"}'])
def test_garbage_on_the_side_channel_faults_only_that_connection(stack: RdmaStack, tmpdir_path: str,
                                                                 garbage: bytes) -> None:
    """Design invariant 4 for the side channel: a listener meeting garbage drops that
    connection (nothing leaks) and keeps serving; a client meeting garbage sees a reset."""
    import socket as _socket
    path = f"{tmpdir_path}/g.sock"
    server = stack.listen(path)
    bad = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    bad.connect(path)
    bad.send(garbage)
    deadline = time.monotonic() + DEADLINE
    wait_readable([server.fileno()], deadline)
    assert server.accept() is None
    bad.close()
    # The listener still serves.
    client = stack.connect(path)
    conn = server.accept()
    while conn is None:
        wait_readable([server.fileno()], deadline)
        conn = server.accept()
    a, b = Flow(client, b"fine"), Flow(conn, b"")
    pump([client, conn], lambda: (a.step(), b.step(), bytes(b.got) == b"fine")[2])
    client.close()
    conn.close()
    server.close()
    # A client talking to a "server" that answers garbage.
    lsock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    lsock.bind(path)
    lsock.listen(1)
    try:
        victim = stack.connect(path)
        peer, _ = lsock.accept()
        peer.recv(65536)  # its HELLO
        peer.send(garbage)
        buf = memoryview(bytearray(8))
        pump([victim], lambda: _raises(lambda: victim.read_into(buf), ConnectionResetError))
        victim.close()
        peer.close()
    finally:
        lsock.close()
        os.unlink(path)


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
            f = Flow(c, _LEN.pack(len(msg)) + msg)
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
            pid = _fork(lambda: client_main(idx, w))
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
        echo = Flow(conn, b"")
        pending = bytearray()

        def step() -> bool:
            echo.step()
            pending.extend(echo.got)
            echo.got.clear()
            while pending:
                try:
                    del pending[: conn.send([bytes(pending)])]
                except BlockingIOError:
                    break
            return echo.eof

        pump([conn], step)
        conn.close()
        ws.close()

    lsock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    lsock.bind(path)
    lsock.listen(4)
    pid = _fork(worker_main)
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

    pid = _fork(child)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and stack.device is parent_dev
