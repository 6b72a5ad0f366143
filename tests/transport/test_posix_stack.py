"""PosixStack tests: ports of Ceph's ``test_async_networkstack.cc`` (notes §7.3) plus
Unix/abstract/IPv6 addresses, vectored sends, SO_REUSEPORT and fd adoption.

All on loopback, all driven by a real EventCenter with bounded waits.
"""

from __future__ import annotations

import errno
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from transport.errors import ClosedResourceError
from transport.event_center import READABLE, WRITABLE, EventCenter
from transport.posix import IOV_MAX, PosixConnectedSocket, PosixServerSocket, PosixStack
from transport.stack import Address, ConnectedSocket, SocketOptions


@pytest.fixture
def center() -> Iterator[EventCenter]:
    c = EventCenter(name="posix-test")
    yield c
    c.close()


@pytest.fixture
def stack() -> PosixStack:
    return PosixStack()


def pump(center: EventCenter, done: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = EventCenter.now() + limit
    while not done():
        assert EventCenter.now() < deadline, "condition not reached in time"
        center.process_events(0.05)


def wait_connected(center: EventCenter, sock: ConnectedSocket) -> None:
    """Finish a non-blocking connect the way a worker does: WRITABLE, then is_connected."""
    state: list[int] = []
    fd = sock.fileno()

    def on_writable(_: int) -> None:
        try:
            if sock.is_connected():
                state.append(1)
        except OSError:
            state.append(-1)
            raise

    center.create_file_event(fd, WRITABLE, on_writable)
    try:
        pump(center, lambda: bool(state))
    finally:
        center.delete_file_event(fd, WRITABLE)
    assert sock.is_connected() == 1


def accept_one(center: EventCenter, server: PosixServerSocket) -> PosixConnectedSocket:
    got: list[PosixConnectedSocket] = []

    def on_accept(_: int) -> None:
        s = server.accept()
        if s is not None:
            got.append(s)

    center.create_file_event(server.fileno(), READABLE, on_accept)
    try:
        pump(center, lambda: bool(got))
    finally:
        center.delete_file_event(server.fileno(), READABLE)
    return got[0]


def connected_pair(center: EventCenter, stack: PosixStack, server: PosixServerSocket,
                   ) -> tuple[PosixConnectedSocket, PosixConnectedSocket]:
    client = stack.connect(server.address)
    wait_connected(center, client)
    return client, accept_one(center, server)


def read_exactly(center: EventCenter, sock: ConnectedSocket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = [0]

    def on_read(_: int) -> None:
        while got[0] < n:
            try:
                k = sock.read_into(view[got[0]:])
            except BlockingIOError:
                return
            assert k > 0, "unexpected EOF"
            got[0] += k

    center.create_file_event(sock.fileno(), READABLE, on_read)
    try:
        pump(center, lambda: got[0] == n)
    finally:
        center.delete_file_event(sock.fileno(), READABLE)
    return bytes(buf)


def read_eof(center: EventCenter, sock: ConnectedSocket) -> int:
    buf = memoryview(bytearray(64))
    result: list[int] = []

    def on_read(_: int) -> None:
        try:
            result.append(sock.read_into(buf))
        except BlockingIOError:
            pass

    center.create_file_event(sock.fileno(), READABLE, on_read)
    try:
        pump(center, lambda: bool(result))
    finally:
        center.delete_file_event(sock.fileno(), READABLE)
    return result[0]


def write_all(center: EventCenter, sock: ConnectedSocket, buffers: list[bytes]) -> None:
    pending = [memoryview(b) for b in buffers if b]

    def on_write(_: int) -> None:
        while pending:
            try:
                n = sock.send(pending)
            except BlockingIOError:
                return
            while n:
                if n >= len(pending[0]):
                    n -= len(pending.pop(0))
                else:
                    pending[0] = pending[0][n:]
                    n = 0

    center.create_file_event(sock.fileno(), WRITABLE, on_write)
    try:
        pump(center, lambda: not pending)
    finally:
        center.delete_file_event(sock.fileno(), WRITABLE)


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- Ceph NetworkStackTest ports ---------------------------------------------------------


def test_simple(center: EventCenter, stack: PosixStack) -> None:
    """SimpleTest: listen, connect, accept, 21 bytes; after shutdown send fails with
    EPIPE and read returns 0."""
    server = stack.listen(("127.0.0.1", 0))
    client, conn = connected_pair(center, stack, server)
    try:
        msg = b"hello world 123456789"
        assert len(msg) == 21
        write_all(center, client, [msg])
        assert read_exactly(center, conn, 21) == msg
        client.shutdown()
        client.shutdown()  # idempotent
        with pytest.raises(BrokenPipeError):
            client.send([b"x"])
        assert read_eof(center, client) == 0
        assert read_eof(center, conn) == 0  # the peer sees EOF too
    finally:
        for s in (client, conn, server):
            s.close()


def test_connect_refused(center: EventCenter, stack: PosixStack) -> None:
    """ConnectFailedTest: a port nobody listens on gives ECONNREFUSED (or ECONNRESET)."""
    client = stack.connect(("127.0.0.1", _free_tcp_port()))
    try:
        with pytest.raises((ConnectionRefusedError, ConnectionResetError)):
            wait_connected(center, client)
        with pytest.raises((ConnectionRefusedError, ConnectionResetError)):
            client.is_connected()  # the error is remembered after SO_ERROR was read
    finally:
        client.close()


def test_connect_pending_reports_zero(center: EventCenter, stack: PosixStack) -> None:
    """While the handshake cannot finish, is_connected() is 0 (EINPROGRESS). A listener
    with backlog 0 holds one established connection; further SYNs are dropped while
    its accept queue is full (tcp_conn_request: sk_acceptq_is_full -> drop)."""
    server = stack.listen(("127.0.0.1", 0), SocketOptions(backlog=0))
    first = stack.connect(server.address)
    wait_connected(center, first)
    pending = stack.connect(server.address)
    try:
        assert pending.is_connected() == 0
        assert pending.is_connected() == 0
        pending.shutdown()  # ENOTCONN while connecting: ignored
        assert "connecting" in repr(pending)
    finally:
        pending.close()
        first.close()
        server.close()


def test_unix_connect_to_full_backlog_is_eagain(stack: PosixStack, tmp_path: Path) -> None:
    """A non-blocking Unix connect never pends: with the backlog full it fails with
    EAGAIN at once (unix(7); af_unix.c unix_recvq_full)."""
    addr = str(tmp_path / "full.sock")
    server = stack.listen(addr, SocketOptions(backlog=0))
    first = stack.connect(addr)
    try:
        assert first.is_connected() == 1
        with pytest.raises(BlockingIOError):
            stack.connect(addr)
    finally:
        first.close()
        server.close()


def test_listen_twice_is_addrinuse(stack: PosixStack) -> None:
    """ListenTest."""
    server = stack.listen(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError) as info:
            stack.listen(server.address)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        server.close()


def test_accept_and_close(center: EventCenter, stack: PosixStack) -> None:
    """AcceptAndCloseTest: accept is None (EAGAIN) before any connect; after the
    listener is closed, connect is refused."""
    server = stack.listen(("127.0.0.1", 0))
    addr = server.address
    assert server.accept() is None
    client, conn = connected_pair(center, stack, server)
    assert server.accept() is None
    client.close()
    conn.close()
    server.close()
    server.close()  # idempotent
    with pytest.raises(ClosedResourceError):
        server.accept()
    late = stack.connect(addr)
    try:
        with pytest.raises((ConnectionRefusedError, ConnectionResetError)):
            wait_connected(center, late)
    finally:
        late.close()


def test_complex_stream(center: EventCenter, stack: PosixStack) -> None:
    """ComplexTest: 2 x 100 x 10,240 bytes each way at once, verified."""
    server = stack.listen(("127.0.0.1", 0))
    a, b = connected_pair(center, stack, server)
    try:
        chunks = [bytes([i % 251]) * 10240 for i in range(100)]
        payload = b"".join(chunks)
        state = {"a_out": 0, "b_out": 0}
        received = {a.fileno(): bytearray(), b.fileno(): bytearray()}
        socks = {a.fileno(): a, b.fileno(): b}
        buf = memoryview(bytearray(65536))

        def on_read(fd: int) -> None:
            try:
                n = socks[fd].read_into(buf)
            except BlockingIOError:
                return
            received[fd] += buf[:n]

        def on_write(fd: int) -> None:
            key = "a_out" if fd == a.fileno() else "b_out"
            off = state[key]
            try:
                off += socks[fd].send([memoryview(payload)[off:off + 200_000]])
            except BlockingIOError:
                return
            state[key] = off
            if off == len(payload):
                center.delete_file_event(fd, WRITABLE)

        for s in (a, b):
            center.create_file_event(s.fileno(), READABLE, on_read)
            center.create_file_event(s.fileno(), WRITABLE, on_write)
        pump(center, lambda: all(len(r) == len(payload) for r in received.values()), 30.0)
        assert all(bytes(r) == payload for r in received.values())
        for s in (a, b):
            center.delete_file_event(s.fileno(), READABLE | WRITABLE)
    finally:
        a.close()
        b.close()
        server.close()


# -- beyond Ceph ---------------------------------------------------------------------------


def test_vectored_send_of_more_than_iov_max_buffers(center: EventCenter, stack: PosixStack) -> None:
    server = stack.listen(("127.0.0.1", 0))
    client, conn = connected_pair(center, stack, server)
    try:
        bufs = [b"%05d|" % i for i in range(IOV_MAX * 2 + 7)]
        first = client.send(bufs)
        assert 0 < first <= IOV_MAX * 6  # one sendmsg: at most IOV_MAX buffers
        expect = b"".join(bufs)
        write_all(center, client, [expect[first:]])
        assert read_exactly(center, conn, len(expect)) == expect
        assert client.send([]) == 0
        assert client.send((bytearray(b"ab"), memoryview(b"cd"))) == 4
        assert read_exactly(center, conn, 4) == b"abcd"
    finally:
        for s in (client, conn, server):
            s.close()


def test_send_backpressure_raises_blocking(center: EventCenter, stack: PosixStack) -> None:
    server = stack.listen(("127.0.0.1", 0))
    client, conn = connected_pair(center, stack, server)
    try:
        block = b"z" * (1 << 20)
        total = 0
        with pytest.raises(BlockingIOError):
            for _ in range(1000):  # bounded: loopback buffers are a few MiB at most
                total += client.send([block])
        assert total > 0
        with pytest.raises(BlockingIOError):
            client.read_into(memoryview(bytearray(16)))  # nothing came back: EAGAIN
    finally:
        for s in (client, conn, server):
            s.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_unix_sockets(center: EventCenter, stack: PosixStack, tmp_path: Path, abstract: bool) -> None:
    addr: Address = f"\0asyncmsgr-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "s.sock")
    server = stack.listen(addr)
    assert server.address == addr
    client, conn = connected_pair(center, stack, server)
    try:
        write_all(center, client, [b"over ", b"unix"])
        assert read_exactly(center, conn, 9) == b"over unix"
        assert conn.local_address == addr
        assert client.peer_address == addr
    finally:
        for s in (client, conn, server):
            s.close()
    if not abstract:
        assert isinstance(addr, str) and not os.path.exists(addr)  # the binder removes its path
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        stack.connect(addr)


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
def test_ipv6_loopback(center: EventCenter, stack: PosixStack) -> None:
    server = stack.listen(("::1", 0))
    addr = server.address
    assert isinstance(addr, tuple) and addr[0] == "::1" and addr[1] > 0
    client, conn = connected_pair(center, stack, server)
    try:
        write_all(center, client, [b"six"])
        assert read_exactly(center, conn, 3) == b"six"
        assert conn.peer_address is not None and conn.peer_address[0] == "::1"
    finally:
        for s in (client, conn, server):
            s.close()


def test_reuseport_two_listeners(center: EventCenter, stack: PosixStack) -> None:
    opts = SocketOptions(reuseport=True)
    first = stack.listen(("127.0.0.1", 0), opts)
    second = stack.listen(first.address, opts)
    try:
        assert first.address == second.address
        assert os.fstat(first.fileno()).st_ino != os.fstat(second.fileno()).st_ino
        with pytest.raises(OSError) as info:  # without the option the port stays taken
            stack.listen(first.address)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        first.close()
        second.close()


def test_options_applied(stack: PosixStack) -> None:
    server = stack.listen(("127.0.0.1", 0), SocketOptions(rcvbuf=65536, sndbuf=65536, backlog=8))
    client = stack.connect(server.address, SocketOptions(rcvbuf=32768))
    try:
        ssock = server.socket
        assert ssock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert ssock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert not ssock.getblocking()
        assert not ssock.get_inheritable()  # CLOEXEC
        csock = client.socket
        assert csock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert not csock.getblocking() and not csock.get_inheritable()
        assert csock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 32768
    finally:
        client.close()
        server.close()


def test_accepted_socket_is_nonblocking_nodelay(center: EventCenter, stack: PosixStack) -> None:
    server = stack.listen(("127.0.0.1", 0))
    client, conn = connected_pair(center, stack, server)
    try:
        assert not conn.socket.getblocking()
        assert conn.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert not conn.socket.get_inheritable()
        assert conn.peer_address == client.local_address
        assert conn.local_address == server.address
    finally:
        for s in (client, conn, server):
            s.close()


def test_detach_and_adopt(center: EventCenter, stack: PosixStack) -> None:
    """A handed-off fd (detach -> from_fd) keeps the stream and its options."""
    server = stack.listen(("127.0.0.1", 0))
    client, conn = connected_pair(center, stack, server)
    try:
        fd = conn.detach()
        assert conn.closed
        with pytest.raises(ClosedResourceError):
            conn.read_into(memoryview(bytearray(1)))
        with pytest.raises(ClosedResourceError):
            conn.detach()
        conn.close()  # no-op: the fd belongs to the caller now
        os.set_blocking(fd, True)  # as a receiver would find it after SCM_RIGHTS
        adopted = PosixConnectedSocket.from_fd(fd)
        assert adopted.fileno() == fd and adopted.is_connected() == 1
        assert not adopted.socket.getblocking()
        write_all(center, client, [b"after handoff"])
        assert read_exactly(center, adopted, 13) == b"after handoff"
        adopted.close()
        s1, s2 = socket.socketpair()
        from_sock = PosixConnectedSocket.from_socket(s1)
        s2.send(b"u")
        assert read_exactly(center, from_sock, 1) == b"u"
        from_sock.close()
        s2.close()
    finally:
        for s in (client, conn, server):
            s.close()


def test_closed_socket_io_raises(center: EventCenter, stack: PosixStack) -> None:
    server = stack.listen(("127.0.0.1", 0))
    client, conn = connected_pair(center, stack, server)
    for s in (client, conn, server):
        s.close()
    client.close()
    client.shutdown()  # closed: no-op
    with pytest.raises(ClosedResourceError):
        client.send([b"x"])
    with pytest.raises(ClosedResourceError):
        client.read_into(memoryview(bytearray(1)))


def test_hostname_address(center: EventCenter, stack: PosixStack) -> None:
    server = stack.listen(("localhost", 0))
    client, conn = connected_pair(center, stack, server)
    for s in (client, conn, server):
        s.close()


def test_bad_addresses(stack: PosixStack) -> None:
    with pytest.raises(ValueError):
        stack.listen("")
    with pytest.raises(OSError):
        stack.connect("/nonexistent/dir/for/asyncmsgr.sock")
