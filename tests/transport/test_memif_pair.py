"""Python ↔ Python memif: both roles, in two processes (client here, server forked).

Covers the handshake (abstract and filesystem sockets), several queue pairs, chained
descriptors, interrupt mode (eventfd kicks) and poll mode (MASK_INT), descriptor flags
cleared on re-post, hugepage regions, handshake refusals and the connect retry.
"""

from __future__ import annotations

import os
import select
import threading
import time

import pytest

from transport.memif import (MemifConfig, MemifConnector, MemifDisconnected, MemifInterface,
                             MemifListener, MemifProtocolError, connect, wire)

from .test_memif_support import echo_server, fork_peer, reserved_hugepages, wait_child


def _addr(tmp_path, kind: str) -> str:
    if kind == "abstract":
        return f"@amsgr-test-{os.getpid()}-{time.monotonic_ns()}"
    return str(tmp_path / "memif.sock")


def _roundtrip(iface: MemifInterface, frames: list[bytes], qid: int = 0,
               window: int | None = None, timeout: float = 20.0) -> list[bytes]:
    """Send ``frames`` (at most ``window`` in flight) and collect the echoes."""
    window = window or iface.ring_size(qid) // 2
    got: list[bytes] = []
    sent = 0
    deadline = time.monotonic() + timeout
    while len(got) < len(frames):
        assert time.monotonic() < deadline, f"only {len(got)}/{len(frames)} echoed"
        if sent < len(frames) and sent - len(got) < window:
            sent += iface.tx_burst(frames[sent:min(len(frames), len(got) + window)], qid)
        if iface.interrupt:
            select.select([iface.fileno(qid)], [], [], 0.05)
            iface.clear_interrupt(qid)
        got += [bytes(f) for f in iface.rx_burst(256, qid)]
    return got


def _run_with_server(addr: str, srv_cfg: MemifConfig, cli_cfg: MemifConfig,
                     body) -> None:
    pid = fork_peer(echo_server(addr, srv_cfg))
    try:
        with connect(addr, cli_cfg, timeout=10.0) as iface:
            body(iface)
    finally:
        assert wait_child(pid) == 0, "echo server failed (traceback above)"


@pytest.mark.parametrize("kind", ["abstract", "filesystem"])
@pytest.mark.parametrize("interrupt", [True, False], ids=["interrupt", "poll"])
def test_echo_single_buffer_frames(tmp_path, kind: str, interrupt: bool) -> None:
    addr = _addr(tmp_path, kind)
    frames = [os.urandom(1 + i % 1500) for i in range(5000)]

    def body(iface: MemifInterface) -> None:
        assert iface.role == "client" and iface.queues == 1
        # Poll mode: we read S2C and told the server not to kick us.
        assert iface.rx_rings[0].flags == (0 if interrupt else wire.RING_FLAG_MASK_INT)
        assert _roundtrip(iface, frames) == frames

    _run_with_server(addr, MemifConfig(interrupt=interrupt), MemifConfig(interrupt=interrupt, hugepages=False), body)
    if kind == "filesystem":
        assert not os.path.exists(addr)  # the listener removed its socket file


def test_chained_frames_larger_than_a_buffer(tmp_path) -> None:
    addr = _addr(tmp_path, "abstract")
    sizes = [2047, 2048, 2049, 4096, 6000, 9000, 16384, 1, 65535]
    frames = [bytes((i * 7 + k) % 256 for k in range(n)) for i, n in enumerate(sizes)] * 20

    def body(iface: MemifInterface) -> None:
        assert _roundtrip(iface, frames, window=64) == frames

    _run_with_server(addr, MemifConfig(), MemifConfig(buffer_size=2048, hugepages=False), body)


def test_several_queue_pairs(tmp_path) -> None:
    addr = _addr(tmp_path, "abstract")

    def body(iface: MemifInterface) -> None:
        assert iface.queues == 4
        for q in range(4):
            frames = [bytes([q]) * (100 + i) for i in range(300)]
            assert _roundtrip(iface, frames, qid=q) == frames

    _run_with_server(addr, MemifConfig(queues=4), MemifConfig(queues=4, log2_ring_size=8,
                                                              hugepages=False), body)


def test_queue_count_negotiated_down_to_server_limit(tmp_path) -> None:
    addr = _addr(tmp_path, "abstract")

    def body(iface: MemifInterface) -> None:
        assert iface.queues == 2 and iface.ring_size() == 1 << 9
        assert _roundtrip(iface, [b"x" * 60] * 10, qid=1) == [b"x" * 60] * 10

    _run_with_server(addr, MemifConfig(queues=2, log2_ring_size=9),
                     MemifConfig(queues=8, log2_ring_size=12, hugepages=False), body)


@pytest.mark.needs_root
def test_hugepage_region(tmp_path) -> None:
    if os.geteuid() != 0 or not os.access("/proc/sys/vm/nr_hugepages", os.W_OK):
        pytest.skip("reserving hugepages needs root (writes /proc/sys/vm/nr_hugepages)")
    addr = _addr(tmp_path, "abstract")
    with reserved_hugepages(8) as got:
        if got < 3:
            pytest.skip(f"kernel reserved only {got} of 8 hugepages (memory fragmented)")

        def body(iface: MemifInterface) -> None:
            assert iface.hugetlb, "region fell back to a plain memfd despite free hugepages"
            frames = [os.urandom(64)] * 2000
            assert _roundtrip(iface, frames) == frames

        _run_with_server(addr, MemifConfig(), MemifConfig(hugepages=True), body)


def _in_process_pair(addr: str, srv: MemifConfig, cli: MemifConfig,
                     ids: set[int] | None = None) -> tuple[MemifListener, MemifInterface, MemifInterface]:
    lst = MemifListener(addr, srv, ids=ids)
    conn = MemifConnector(addr, cli)
    s = c = None
    deadline = time.monotonic() + 5
    try:
        while s is None or c is None:
            assert time.monotonic() < deadline, "handshake did not finish"
            s = s or lst.accept()
            c = c or conn.step()
    except BaseException:
        conn.abort()
        lst.close()
        raise
    return lst, c, s


def test_flags_cleared_when_reposting() -> None:
    """§5 trap 5: a server that leaves NEXT on a descriptor must not corrupt later frames."""
    lst, c, s = _in_process_pair(f"@amsgr-flags-{os.getpid()}", MemifConfig(), MemifConfig(hugepages=False))
    with lst, c, s:
        ring = c.rx_rings[0]
        assert s.tx_burst([b"a" * 5000]) == 1  # 3 slots, NEXT on the first two
        [frame] = c.rx_burst(8)
        assert bytes(frame) == b"a" * 5000
        c.rx_release()
        for slot in range(3):
            assert ring.desc[slot * 4] & wire.DESC_FLAG_NEXT == 0
            assert ring.desc[slot * 4 + 1] == 2048  # full capacity re-posted
        assert ring.head == (3 + ring.size) & 0xFFFF


def test_interrupt_kicks_and_mask_int() -> None:
    lst, c, s = _in_process_pair(f"@amsgr-kick-{os.getpid()}", MemifConfig(interrupt=True),
                                 MemifConfig(interrupt=False, hugepages=False))
    with lst, c, s:
        # The client polls (MASK_INT on S2C): the server's tx must not kick.
        assert c.rx_rings[0].flags == wire.RING_FLAG_MASK_INT
        assert s.tx_burst([b"x"]) == 1
        assert select.select([c.fileno()], [], [], 0)[0] == []
        assert [bytes(f) for f in c.rx_burst()] == [b"x"]
        # The server sleeps on its eventfd (MASK_INT clear on C2S): the client kicks.
        assert s.rx_rings[0].flags == 0
        assert c.tx_burst([b"y"]) == 1
        assert select.select([s.fileno()], [], [], 5.0)[0] == [s.fileno()]
        s.clear_interrupt()
        assert [bytes(f) for f in s.rx_burst()] == [b"y"]
        assert select.select([s.fileno()], [], [], 0)[0] == []


def test_full_ring_takes_nothing_more() -> None:
    lst, c, s = _in_process_pair(f"@amsgr-full-{os.getpid()}", MemifConfig(),
                                 MemifConfig(log2_ring_size=4, hugepages=False))
    with lst, c, s:
        assert c.tx_burst([b"z"] * 40) == 16
        assert c.tx_burst([b"z"]) == 0
        assert len(s.rx_burst(100)) == 16
        s.rx_release()
        assert c.tx_space() == 16


def test_handshake_refusals() -> None:
    addr = f"@amsgr-refuse-{os.getpid()}"
    with MemifListener(addr, MemifConfig(secret=b"pw"), ids={3}) as lst:
        for cfg, reason in [(MemifConfig(id=4, secret=b"pw", hugepages=False), "ID not found"),
                            (MemifConfig(id=3, hugepages=False), "Secret required"),
                            (MemifConfig(id=3, secret=b"no", hugepages=False), "Incorrect secret")]:
            conn = MemifConnector(addr, cfg)
            with pytest.raises(MemifDisconnected, match=reason):
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    lst.accept()
                    conn.step()
            assert lst.rejected[-1].endswith(reason)


def test_server_rejects_unexpected_message() -> None:
    import socket as _s
    from transport.memif.control import recv_msg, send_msg
    addr = f"@amsgr-unexp-{os.getpid()}"
    with MemifListener(addr) as lst:
        sock = _s.socket(_s.AF_UNIX, _s.SOCK_SEQPACKET)
        try:
            sock.connect("\0" + addr[1:])
            sock.settimeout(5)
            lst.accept()
            assert isinstance(recv_msg(sock)[0], wire.Hello)
            send_msg(sock, wire.Connect(b"early"))  # CONNECT before INIT
            lst.accept()
            msg, _ = recv_msg(sock)
            assert msg == wire.Disconnect(0, b"Unexpected message")
            assert sock.recv(128) == b""  # and the server hung up
        finally:
            sock.close()
        sock = _s.socket(_s.AF_UNIX, _s.SOCK_SEQPACKET)
        try:  # a datagram that is not 128 bytes: refused ("Invalid message size" in DPDK)
            sock.connect("\0" + addr[1:])
            sock.settimeout(5)
            lst.accept()
            recv_msg(sock)
            sock.send(b"short")
            assert select.select([lst.fileno()], [], [], 5)[0]
            assert lst.accept() is None
            assert "size" in lst.rejected[-1]
        finally:
            sock.close()


def test_connect_retries_until_id_is_served() -> None:
    """§5 trap 1: a DPDK port answers "ID not found" until it is started; retry."""
    addr = f"@amsgr-retry-{os.getpid()}"
    with MemifListener(addr, ids=set()) as lst:
        result: list[object] = []

        def client() -> None:
            try:
                result.append(connect(addr, MemifConfig(id=9, hugepages=False), timeout=10))
            except BaseException as e:  # reported below
                result.append(e)

        t = threading.Thread(target=client)
        t.start()
        deadline = time.monotonic() + 10
        served = None
        while served is None and time.monotonic() < deadline:
            if any("ID not found" in r for r in lst.rejected):
                lst.ids = {9}  # the "port" starts
            served = lst.accept()
            select.select([lst.fileno()], [], [], 0.05)
        t.join(10)
        assert served is not None and isinstance(result[0], MemifInterface)
        served.close()
        result[0].close()  # type: ignore[union-attr]


def test_connect_gives_up_at_deadline() -> None:
    with pytest.raises(OSError):
        connect(f"@amsgr-nobody-{os.getpid()}", MemifConfig(hugepages=False), timeout=0.2)


def test_peer_exit_is_seen_as_disconnect(tmp_path) -> None:
    addr = _addr(tmp_path, "abstract")
    pid = fork_peer(echo_server(addr, MemifConfig()))
    iface = connect(addr, MemifConfig(hugepages=False), timeout=10)
    try:
        os.kill(pid, 15)
        assert wait_child(pid) == -15
        assert select.select([iface.ctrl_fileno()], [], [], 5)[0]
        with pytest.raises(MemifDisconnected):
            iface.poll_control()
        # Our own memory stays mapped: the data path still works (nothing to read).
        assert iface.rx_burst() == []
    finally:
        iface.close()


def test_protocol_error_type() -> None:
    assert issubclass(MemifProtocolError, OSError)


def test_bad_descriptor_from_peer_breaks_only_that_connection() -> None:
    """Descriptors are peer-written: an unknown region index is a protocol error, a
    buffer past the region end never reads or writes outside the mapping."""
    from transport.errors import BrokenResourceError
    lst, c, s = _in_process_pair(f"@amsgr-bad-{os.getpid()}", MemifConfig(), MemifConfig(hugepages=False))
    with lst, c, s:
        ring = c.tx_rings[0]
        assert c.tx_burst([b"ok"]) == 1
        ring.desc[0] = 7 << 16  # region 7 was never added
        with pytest.raises(BrokenResourceError):
            s.rx_burst()
        # S2C: the client "posts" a buffer beyond its region; the server refuses to write.
        c.rx_rings[0].desc[2] = (1 << 32) - 16
        with pytest.raises(BrokenResourceError):
            s.tx_burst([b"x" * 64])


def _raw_client(addr: str, lst: MemifListener):
    import socket as _s
    from transport.memif.control import recv_msg
    sock = _s.socket(_s.AF_UNIX, _s.SOCK_SEQPACKET)
    sock.connect("\0" + addr[1:])
    sock.settimeout(5)
    lst.accept()
    assert isinstance(recv_msg(sock)[0], wire.Hello)
    return sock


def test_ring_outside_region_is_refused_with_a_reason() -> None:
    from transport.memif.control import recv_msg, send_msg
    addr = f"@amsgr-badring-{os.getpid()}"
    with MemifListener(addr) as lst:
        sock = _raw_client(addr, lst)
        region = os.memfd_create("tiny", os.MFD_CLOEXEC)
        efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
        try:
            os.ftruncate(region, 4096)
            script = [(wire.Init(), None), (wire.AddRegion(0, 4096), region),
                      (wire.AddRing(wire.RING_FLAG_C2S, 0, 0, 4000, 10, 0), efds[0]),
                      (wire.AddRing(0, 0, 0, 0, 10, 0), efds[1])]
            for msg, fd in script:
                send_msg(sock, msg, fd)
                lst.accept()
                assert recv_msg(sock)[0] == wire.Ack()
            send_msg(sock, wire.Connect(b"x"))
            lst.accept()
            msg, _ = recv_msg(sock)
            assert isinstance(msg, wire.Disconnect) and msg.reason.startswith(b"Invalid ring or region")
            assert lst.accept() is None and not lst._pending  # that handshake is gone
        finally:
            sock.close()
            os.close(region)
            for fd in efds:
                os.close(fd)


def test_random_control_datagrams_fault_only_their_connection() -> None:
    """Invariant 4 of DESIGN.md for the memif listener: garbage never breaks it."""
    import random
    rng = random.Random(11)
    addr = f"@amsgr-garbage-{os.getpid()}"
    with MemifListener(addr) as lst:
        for _ in range(60):
            sock = _raw_client(addr, lst)
            try:
                for _ in range(rng.randint(1, 4)):
                    kind = rng.randrange(3)
                    data = (bytes([rng.randrange(9), 0]) + rng.randbytes(126) if kind == 0 else
                            rng.randbytes(rng.randint(0, 300)) if kind == 1 else
                            wire.pack(wire.Init(version=rng.randrange(0x10000), id=0)))
                    try:
                        sock.send(data)
                    except OSError:
                        break
                    lst.accept()
            finally:
                sock.close()
            lst.accept()
        # still serving: a proper client connects
        conn = MemifConnector(addr, MemifConfig(hugepages=False))
        s = c = None
        deadline = time.monotonic() + 5
        while (s is None or c is None) and time.monotonic() < deadline:
            s = s or lst.accept()
            c = c or conn.step()
        assert s is not None and c is not None
        s.close()
        c.close()
