"""The verbs interface and the ``softverbs`` provider.

EMULATION: every result here is softverbs (shared memory between processes), not RDMA.
No RDMA device exists on these machines; nothing here says anything about real verbs.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest

from transport.fdpass import recv_fds, send_fds, seqpacket_pair
from transport.rdma.softverbs import SoftCQ, SoftDevice, SoftVerbsProvider
from transport.rdma.verbs import (
    LEGAL_TRANSITIONS,
    Access,
    MemoryRegion,
    PeerInfo,
    QPCaps,
    QPParams,
    QPState,
    QPStateError,
    VerbsError,
    WCOpcode,
    WCStatus,
    WorkCompletion,
    check_transition,
)

RW = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ
FAST_RNR = QPParams(min_rnr_timer=1)  # responders NAK with a 0.01 ms timer


def wait_wcs(cq: SoftCQ, n: int, timeout: float = 10.0) -> list[WorkCompletion]:
    """Poll until ``n`` completions, sleeping only in select() on the CQ's fd."""
    out: list[WorkCompletion] = []
    deadline = time.monotonic() + timeout
    while True:
        out += cq.poll(64)
        if len(out) >= n:
            return out
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"only {len(out)} of {n} completions in {timeout}s: {out}")
        select.select([cq.fileno()], [], [], left)


class Side:
    """One end in this process: device, CQ, MR, QP."""

    def __init__(self, caps: QPCaps = QPCaps(16, 16), params: QPParams = FAST_RNR,
                 mr_size: int = 1 << 16, access: Access = RW) -> None:
        self.dev = SoftVerbsProvider().open_device()
        self.cq = self.dev.create_cq()
        self.mr = self.dev.register(mr_size, access)
        self.qp = self.dev.create_qp(self.cq, self.cq, caps, params)
        self.qp.to_init()

    def close(self) -> None:
        self.qp.close()
        self.cq.close()
        self.dev.close()


@pytest.fixture
def pair() -> Iterator[tuple[Side, Side]]:
    a, b = Side(), Side()
    a.qp.connect(b.qp.local_info())
    b.qp.connect(a.qp.local_info())
    yield a, b
    a.close()
    b.close()


# -- interface: states --------------------------------------------------------------------------

def test_legal_transitions_table() -> None:
    check_transition(QPState.RESET, QPState.INIT)
    check_transition(QPState.INIT, QPState.RTR)
    check_transition(QPState.RTR, QPState.RTS)
    for s in QPState:
        check_transition(s, QPState.ERR)
        check_transition(s, QPState.RESET)
    for bad in [(QPState.RESET, QPState.RTR), (QPState.RESET, QPState.RTS), (QPState.INIT, QPState.RTS),
                (QPState.ERR, QPState.RTS), (QPState.RTS, QPState.RTR)]:
        with pytest.raises(QPStateError):
            check_transition(*bad)
    assert set(LEGAL_TRANSITIONS) == set(QPState)


def test_qp_state_rules() -> None:
    a, b = Side(), Side()
    try:
        assert a.qp.state == QPState.RESET or a.qp.state == QPState.INIT
        fresh = a.dev.create_qp(a.cq, a.cq)
        with pytest.raises(QPStateError):
            fresh.post_recv(1, a.mr, 0, 64)  # RESET
        with pytest.raises(QPStateError):
            fresh.local_info()
        fresh.close()
        with pytest.raises(QPStateError):
            a.qp.post_send(1, a.mr, 0, 8)  # INIT: sending needs RTS
        a.qp.post_recv(1, a.mr, 0, 64)  # allowed from INIT on, before the peer is known
        info = b.qp.local_info()
        a.qp.connect(info)
        assert a.qp.state == QPState.RTS
        with pytest.raises(QPStateError):
            a.qp.connect(PeerInfo({}, []))  # RTS -> RTR is illegal
        assert a.qp.rq_psn == a.qp.psn and a.qp.sq_psn == b.qp.psn  # ibverbs' PSN pairing
    finally:
        a.close()
        b.close()


def test_queue_depth_limits(pair: tuple[Side, Side]) -> None:
    a, _ = pair
    for i in range(16):
        a.qp.post_recv(i, a.mr, 0, 64)
    with pytest.raises(VerbsError):
        a.qp.post_recv(99, a.mr, 0, 64)


# -- RC semantics (EMULATION) -------------------------------------------------------------------

def test_in_order_delivery_and_completions(pair: tuple[Side, Side]) -> None:
    a, b = pair
    for i in range(8):
        b.qp.post_recv(100 + i, b.mr, i * 1024, 1024)
    for i in range(8):
        a.mr.buf[i * 64: i * 64 + 5] = b"msg%02d" % i
        a.qp.post_send(i, a.mr, i * 64, 5)
    sends = wait_wcs(a.cq, 8)
    assert [w.wr_id for w in sends] == list(range(8))
    assert all(w.ok and w.opcode == WCOpcode.SEND and w.byte_len == 5 for w in sends)
    recvs = wait_wcs(b.cq, 8)
    assert [w.wr_id for w in recvs] == [100 + i for i in range(8)]
    assert all(w.ok and w.opcode == WCOpcode.RECV and w.qp_num == b.qp.qp_num for w in recvs)
    assert [bytes(b.mr.buf[i * 1024: i * 1024 + 5]) for i in range(8)] == [b"msg%02d" % i for i in range(8)]


def test_unsignaled_send_completes_silently(pair: tuple[Side, Side]) -> None:
    a, b = pair
    b.qp.post_recv(1, b.mr, 0, 64)
    a.qp.post_send(7, a.mr, 0, 4, signaled=False)
    assert a.cq.poll() == []
    assert [w.wr_id for w in wait_wcs(b.cq, 1)] == [1]


def test_rnr_retry_exceeded_moves_qp_to_error() -> None:
    a, b = Side(params=QPParams(rnr_retry=2, min_rnr_timer=1)), Side(params=FAST_RNR)
    try:
        a.qp.connect(b.qp.local_info())
        b.qp.connect(a.qp.local_info())
        a.qp.post_send(1, a.mr, 0, 8)  # b posted no receive
        a.qp.post_send(2, a.mr, 0, 8)  # queued behind it (in order)
        wcs = wait_wcs(a.cq, 2)
        assert [(w.wr_id, w.status) for w in wcs] == [(1, WCStatus.RNR_RETRY_EXC_ERR), (2, WCStatus.WR_FLUSH_ERR)]
        assert a.qp.state == QPState.ERR
        assert a.dev.stats["rnr"] == 3  # the first try plus rnr_retry=2 retries
        a.qp.post_send(3, a.mr, 0, 8)  # posting to an ERR QP flushes at once
        assert [(w.wr_id, w.status) for w in a.cq.poll()] == [(3, WCStatus.WR_FLUSH_ERR)]
    finally:
        a.close()
        b.close()


def test_rnr_retry_succeeds_once_a_receive_is_posted(pair: tuple[Side, Side]) -> None:
    a, b = pair  # rnr_retry=7: retry forever
    a.qp.post_send(1, a.mr, 0, 8)
    assert a.cq.poll() == [] and a.cq.next_timeout() is not None
    b.qp.post_recv(5, b.mr, 0, 64)
    wcs = wait_wcs(a.cq, 1)  # woken by the emulated RNR timer (a timerfd in the CQ's epoll)
    assert wcs[0].ok and a.dev.stats["rnr"] >= 1
    assert [w.wr_id for w in wait_wcs(b.cq, 1)] == [5]


def test_length_error_fails_both_sides(pair: tuple[Side, Side]) -> None:
    a, b = pair
    b.qp.post_recv(1, b.mr, 0, 4)
    b.qp.post_recv(2, b.mr, 64, 64)
    a.qp.post_send(9, a.mr, 0, 16)
    assert [(w.wr_id, w.status) for w in wait_wcs(a.cq, 1)] == [(9, WCStatus.REM_INV_REQ_ERR)]
    assert a.qp.state == QPState.ERR
    got = wait_wcs(b.cq, 2)
    assert [(w.wr_id, w.status) for w in got] == [(1, WCStatus.LOC_LEN_ERR), (2, WCStatus.WR_FLUSH_ERR)]
    assert b.qp.state == QPState.ERR


def test_receive_into_region_without_local_write_is_protection_error() -> None:
    a, b = Side(), Side(access=Access.NONE)
    try:
        a.qp.connect(b.qp.local_info())
        b.qp.connect(a.qp.local_info())
        b.qp.post_recv(1, b.mr, 0, 64)
        a.qp.post_send(2, a.mr, 0, 8)
        assert wait_wcs(a.cq, 1)[0].status == WCStatus.REM_OP_ERR
        assert wait_wcs(b.cq, 1)[0].status == WCStatus.LOC_PROT_ERR
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("case", ["ok", "bad_rkey", "out_of_bounds", "no_access", "read_ok", "read_denied"])
def test_one_sided_checks(case: str) -> None:
    a = Side()
    b = Side(access=Access.LOCAL_WRITE | (Access.NONE if case in ("no_access", "read_denied") else RW))
    try:
        a.qp.connect(b.qp.local_info())
        b.qp.connect(a.qp.local_info())
        a.mr.buf[:6] = b"remote"
        b.mr.buf[100:104] = b"peer"
        addr, rkey = b.mr.addr + 10, b.mr.rkey
        if case == "bad_rkey":
            rkey ^= 0x5A5A
        if case == "out_of_bounds":
            addr = b.mr.addr + b.mr.length - 3
        if case.startswith("read"):
            a.qp.rdma_read(1, a.mr, 200, 4, b.mr.addr + 100, rkey)
        else:
            a.qp.rdma_write(1, a.mr, 0, 6, addr, rkey)
        wc = wait_wcs(a.cq, 1)[0]
        if case == "ok":
            assert wc.ok and wc.opcode == WCOpcode.RDMA_WRITE
            assert bytes(b.mr.buf[10:16]) == b"remote"  # no action by the target's CPU
            assert b.cq.poll() == []  # and no completion at the target
        elif case == "read_ok":
            assert wc.ok and wc.opcode == WCOpcode.RDMA_READ and bytes(a.mr.buf[200:204]) == b"peer"
        else:
            assert wc.status == WCStatus.REM_ACCESS_ERR and a.qp.state == QPState.ERR
            assert bytes(b.mr.buf[10:16]) == bytes(6)
    finally:
        a.close()
        b.close()


def test_peer_qp_error_gives_retry_exceeded(pair: tuple[Side, Side]) -> None:
    a, b = pair
    for i in range(3):
        a.qp.post_recv(i, a.mr, 0, 64)
    b.qp.to_error()
    a.qp.post_send(1, a.mr, 0, 8)
    assert [(w.wr_id, w.status) for w in wait_wcs(a.cq, 4)] == [
        (1, WCStatus.RETRY_EXC_ERR), (0, WCStatus.WR_FLUSH_ERR), (1, WCStatus.WR_FLUSH_ERR), (2, WCStatus.WR_FLUSH_ERR)]


def test_flush_of_receives_waits_until_the_peer_is_quiet(pair: tuple[Side, Side]) -> None:
    """A's receives are flushed only when B can no longer consume them (no double
    completion of one receive): B in ERR, destroyed, or dead."""
    a, b = pair
    a.qp.post_recv(1, a.mr, 0, 64)
    a.qp.post_recv(2, a.mr, 64, 64)
    b.qp.post_send(10, b.mr, 0, 8)  # consumes receive 1
    a.qp.to_error()
    assert [(w.wr_id, w.status) for w in a.cq.poll()] == [(1, WCStatus.SUCCESS)]
    b.qp.close()  # destroyed: rings A's doorbell
    assert [(w.wr_id, w.status) for w in wait_wcs(a.cq, 1)] == [(2, WCStatus.WR_FLUSH_ERR)]


def test_region_fds_are_owned_by_receiver_of_local_info() -> None:
    a = Side()
    try:
        info = a.qp.local_info()
        assert info.info["emulation"] is True and info.info["provider"] == "softverbs"
        assert len(info.fds) == 3  # QP region, doorbell, one MR
        for fd in info.fds:
            os.close(fd)
        with pytest.raises(VerbsError):
            a.qp.connect(PeerInfo({"provider": "pyverbs"}, []))
    finally:
        a.close()


# -- two processes (EMULATION) --------------------------------------------------------------------

def _child_main(sock: socket.socket, hold_receives: int) -> None:
    """The peer process: a QP that follows commands from the parent."""
    side = Side(caps=QPCaps(64, 64))
    for i in range(hold_receives):
        side.qp.post_recv(i, side.mr, i * 1024, 1024)
    info = side.qp.local_info()
    send_fds(sock, json.dumps(info.info).encode(), info.fds)
    for fd in info.fds:
        os.close(fd)
    data, fds = recv_fds(sock)
    side.qp.connect(PeerInfo(json.loads(data), fds))
    sock.sendall(b"ready")
    while True:
        cmd = json.loads(sock.recv(4096) or b'{"op": "exit"}')
        if cmd["op"] == "exit":
            break
        if cmd["op"] == "collect":
            wcs = wait_wcs(side.cq, cmd["n"])
            out = [[w.wr_id, int(w.status), w.byte_len,
                    bytes(side.mr.buf[w.wr_id * 1024: w.wr_id * 1024 + w.byte_len]).decode()] for w in wcs]
            sock.sendall(json.dumps(out).encode())
        elif cmd["op"] == "send":
            side.mr.buf[60000:60000 + len(cmd["data"])] = cmd["data"].encode()
            side.qp.post_send(1, side.mr, 60000, len(cmd["data"]))
            sock.sendall(json.dumps([int(w.status) for w in wait_wcs(side.cq, 1)]).encode())
        elif cmd["op"] == "peek":
            sock.sendall(bytes(side.mr.buf[cmd["off"]: cmd["off"] + cmd["len"]]))
    side.close()


class ChildPeer:
    def __init__(self, hold_receives: int = 0) -> None:
        self.sock, theirs = seqpacket_pair()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                self.sock.close()
                theirs.settimeout(20)
                _child_main(theirs, hold_receives)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        theirs.close()
        self.sock.settimeout(20)
        self.side = Side(caps=QPCaps(64, 64))

    def handshake(self) -> None:
        data, fds = recv_fds(self.sock)
        info = self.side.qp.local_info()
        send_fds(self.sock, json.dumps(info.info).encode(), info.fds)
        for fd in info.fds:
            os.close(fd)
        self.side.qp.connect(PeerInfo(json.loads(data), fds))
        assert self.sock.recv(16) == b"ready"

    def rpc(self, **cmd: Any) -> Any:
        self.sock.sendall(json.dumps(cmd).encode())
        return self.sock.recv(1 << 16)

    def finish(self, kill: bool = False) -> int:
        try:
            if kill:
                os.kill(self.pid, signal.SIGKILL)
            else:
                self.sock.sendall(json.dumps({"op": "exit"}).encode())
        except OSError:
            os.kill(self.pid, signal.SIGKILL)  # the child failed already; its stderr says why
        _, status = os.waitpid(self.pid, 0)
        self.sock.close()
        self.side.close()
        return status


def test_two_process_send_recv_in_order() -> None:
    peer = ChildPeer(hold_receives=32)
    try:
        peer.handshake()
        a = peer.side
        for i in range(32):
            msg = f"message {i:03d} from {os.getpid()}".encode()
            a.mr.buf[i * 100: i * 100 + len(msg)] = msg
            a.qp.post_send(i, a.mr, i * 100, len(msg))
        assert all(w.ok for w in wait_wcs(a.cq, 32))
        got = json.loads(peer.rpc(op="collect", n=32))
        assert [g[0] for g in got] == list(range(32))  # receives consumed in posting order
        assert [g[3] for g in got] == [f"message {i:03d} from {os.getpid()}" for i in range(32)]
        # And back: the child sends into a receive we post now.
        a.qp.post_recv(3, a.mr, 3000, 100)
        assert json.loads(peer.rpc(op="send", data="reply")) == [0]
        wc = wait_wcs(a.cq, 1)[0]
        assert wc.ok and bytes(a.mr.buf[3000:3005]) == b"reply"
    finally:
        assert peer.finish() == 0


def test_two_process_rdma_write_lands_without_the_target() -> None:
    peer = ChildPeer()
    try:
        peer.handshake()
        a = peer.side
        target = a.qp._peer_mrs  # what the handshake told us: the child's regions
        (pmr,) = target.values()
        a.mr.buf[:9] = b"one-sided"
        a.qp.rdma_write(1, a.mr, 0, 9, pmr.iova + 4096, pmr.rkey)
        assert wait_wcs(a.cq, 1)[0].ok
        assert peer.rpc(op="peek", off=4096, len=9) == b"one-sided"
    finally:
        assert peer.finish() == 0


def test_peer_death_flushes_outstanding_work() -> None:
    """SIGKILL the peer: the pidfd in the CQ's epoll wakes us, the QP goes to ERR and
    every outstanding receive and send completes with WR_FLUSH_ERR."""
    peer = ChildPeer()
    try:
        peer.handshake()
        a = peer.side
        for i in range(4):
            a.qp.post_recv(i, a.mr, i * 64, 64)
        os.kill(peer.pid, signal.SIGKILL)
        os.waitpid(peer.pid, 0)
        r, _, _ = select.select([a.cq.fileno()], [], [], 10)
        assert r, "peer death did not wake the CQ fd"
        wcs = wait_wcs(a.cq, 4)
        assert [(w.wr_id, w.status) for w in wcs] == [(i, WCStatus.WR_FLUSH_ERR) for i in range(4)]
        assert a.qp.state == QPState.ERR and not a.qp.peer_alive
        a.qp.post_send(9, a.mr, 0, 8)
        assert [(w.wr_id, w.status) for w in a.cq.poll()] == [(9, WCStatus.WR_FLUSH_ERR)]
    finally:
        peer.sock.close()
        peer.side.close()


def test_connect_refuses_other_hosts_and_garbage() -> None:
    a = Side()
    b = Side()
    try:
        info = b.qp.local_info()
        info.info["gid"] = "another-boot-id"
        with pytest.raises(VerbsError):
            a.qp.connect(info)  # its fds are closed on failure (no_leaks checks)
        assert a.qp.state == QPState.INIT
    finally:
        a.close()
        b.close()


def test_memory_regions_are_memfd_regions() -> None:
    dev = SoftDevice()
    try:
        mr = dev.register(3 << 20, RW)
        assert isinstance(mr, MemoryRegion) and mr.length == 3 << 20 and mr.lkey != mr.rkey
        mr.buf[-1] = 7
        assert mr.hugetlb in (True, False)  # hugepages when the host has free ones
        dev.deregister(mr)
    finally:
        dev.close()


def test_responder_not_yet_in_rtr_is_retried_then_fails() -> None:
    """Packets to a QP still in INIT are dropped: the requester retries retry_cnt
    times on its transport timer, then RETRY_EXC_ERR."""
    a, b = Side(params=QPParams(retry_cnt=2, timeout=1)), Side()
    try:
        a.qp.connect(b.qp.local_info())  # b never connects: stays in INIT
        b.qp.post_recv(1, b.mr, 0, 64)
        a.qp.post_send(1, a.mr, 0, 8)
        wcs = wait_wcs(a.cq, 1)
        assert wcs[0].status == WCStatus.RETRY_EXC_ERR and a.dev.stats["retry"] == 2
    finally:
        a.close()
        b.close()


def test_responder_reaching_rtr_in_time_gets_the_message() -> None:
    a, b = Side(params=QPParams(timeout=1)), Side()
    try:
        a.qp.connect(b.qp.local_info())
        b.qp.post_recv(1, b.mr, 0, 64)
        a.qp.post_send(1, a.mr, 0, 8)
        assert a.cq.poll() == []  # b is in INIT: dropped, to be retried
        b.qp.connect(a.qp.local_info())
        assert wait_wcs(a.cq, 1)[0].ok and [w.wr_id for w in wait_wcs(b.cq, 1)] == [1]
    finally:
        a.close()
        b.close()
