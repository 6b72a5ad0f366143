"""The ``rdma`` stack beyond the conformance suite, in one process: credits, shutdown,
close races, side channels. Two-process tests are in ``test_rdma_processes.py``.

EMULATION: these run on the ``softverbs`` provider (shared memory), not on RDMA.
"""

from __future__ import annotations

import os
import random
import struct
import time

import pytest

from tests.transport.rdma.support import (
    DEADLINE,
    Flow,
    establish,
    pump,
    raises,
    wait_readable,
)
from transport.rdma.stack import RdmaConnectedSocket, RdmaStack


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
    pump([conn], lambda: raises(lambda: conn.send([b"x"]), BrokenPipeError))
    assert conn.read_into(memoryview(bytearray(10))) == 0
    conn.close()
    server.close()



def test_peer_close_while_sender_is_blocked_on_credits(stack: RdmaStack, tmpdir_path: str) -> None:
    server, client, conn = establish(stack, f"{tmpdir_path}/b.sock")
    sent = 0
    with pytest.raises(BlockingIOError):
        for _ in range(1000):
            sent += client.send([bytes(4096)])
    assert sent > 0
    conn.close()  # the receiver goes away with our data unread
    pump([client], lambda: raises(lambda: client.send([b"x"]), BrokenPipeError))
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
    pump([late], lambda: raises(lambda: late.read_into(buf), ConnectionResetError))
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
        pump([victim], lambda: raises(lambda: victim.read_into(buf), ConnectionResetError))
        victim.close()
        peer.close()
    finally:
        lsock.close()
        os.unlink(path)
