"""The ``pyverbs`` provider (real libibverbs).

Three groups:

* no device needed: real pyverbs attribute objects (QPInitAttr, QPAttr for INIT/RTR/RTS,
  AHAttr + GlobalRoute + GID, SGE, SendWR, RecvWR) built by the provider's builders and
  checked field by field; skipped only when pyverbs cannot be imported at all;
* a call-order recording fake of the objects that need a device (Context, PD, MR, CQ,
  CompChannel, QP) with the real attribute classes, driving the provider and the whole
  rdma stack: post_recv before ready, post_send only in RTS, re-arm before draining;
* a device needed: skipped with the exact discovery failure (on these machines
  "no RDMA device: ibv_get_device_list failed (ENOSYS)").
"""

from __future__ import annotations

import errno
import os
import select
import tempfile
from types import SimpleNamespace
from typing import Any

import pytest

from transport.rdma import pyverbs_provider as pp
from transport.rdma.verbs import (
    Access,
    NoDeviceError,
    QPCaps,
    QPParams,
    QPState,
    QPStateError,
    WCOpcode,
    WCStatus,
)

IMPORT_ERROR = pp.import_error()
needs_pyverbs = pytest.mark.skipif(IMPORT_ERROR is not None, reason=IMPORT_ERROR or "")
HAVE_DEVICE, DEVICE_REASON = pp.device_status()
needs_device = pytest.mark.skipif(not HAVE_DEVICE, reason=DEVICE_REASON)

GID_A = "fe80:0000:0000:0000:0202:03ff:fe04:0506"
GID_B = "fe80:0000:0000:0000:0a0b:0cff:fe0d:0e0f"


@pytest.fixture
def pv() -> SimpleNamespace:
    return pp.load_pyverbs()


# -- discovery --------------------------------------------------------------------------------

@needs_pyverbs
def test_discovery_failure_means_no_device_with_errno() -> None:
    if HAVE_DEVICE:
        assert pp.list_devices()
        return
    with pytest.raises(NoDeviceError) as info:
        pp.list_devices()
    assert info.value.errno in (errno.ENOSYS, errno.ENODEV, errno.ENOENT, errno.EPERM, errno.EACCES)
    assert str(info.value.strerror).startswith("no RDMA device: ibv_get_device_list")
    assert DEVICE_REASON == info.value.strerror
    with pytest.raises(NoDeviceError):
        pp.PyverbsProvider().open_device()


@needs_pyverbs
def test_auto_provider_falls_back_to_softverbs_emulation() -> None:
    from transport.rdma.stack import get_provider
    p = get_provider("auto")
    assert p.name == ("pyverbs" if HAVE_DEVICE else "softverbs")
    assert p.emulated == (not HAVE_DEVICE)


@needs_pyverbs
def test_numeric_values_match_ibverbs(pv: SimpleNamespace) -> None:
    e = pv.e
    for s in WCStatus:
        assert getattr(e, f"IBV_WC_{s.name}") == s.value
    assert [e.IBV_WC_SEND, e.IBV_WC_RDMA_WRITE, e.IBV_WC_RDMA_READ, e.IBV_WC_RECV] == [o.value for o in WCOpcode]
    assert [e.IBV_QPS_RESET, e.IBV_QPS_INIT, e.IBV_QPS_RTR, e.IBV_QPS_RTS, e.IBV_QPS_ERR] == [s.value for s in QPState]
    assert [e.IBV_ACCESS_LOCAL_WRITE, e.IBV_ACCESS_REMOTE_WRITE, e.IBV_ACCESS_REMOTE_READ] == [
        Access.LOCAL_WRITE, Access.REMOTE_WRITE, Access.REMOTE_READ]


# -- real attribute objects, no device ------------------------------------------------------------

@needs_pyverbs
def test_qp_init_attr_is_rc_with_one_sge(pv: SimpleNamespace) -> None:
    a = pp.qp_init_attr(pv, None, None, QPCaps(33, 17))
    assert a.qp_type == pv.e.IBV_QPT_RC
    assert (a.cap.max_send_wr, a.cap.max_recv_wr, a.cap.max_send_sge, a.cap.max_recv_sge) == (33, 17, 1, 1)
    assert a.sq_sig_all == 0  # completions only for signaled WRs


@needs_pyverbs
def test_init_attr_and_mask(pv: SimpleNamespace) -> None:
    e = pv.e
    a, mask = pp.init_attr(pv, QPParams(port_num=2, pkey_index=1))
    assert mask == e.IBV_QP_STATE | e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_ACCESS_FLAGS
    assert (a.qp_state, a.port_num, a.pkey_index) == (e.IBV_QPS_INIT, 2, 1)
    assert a.qp_access_flags == e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ


@needs_pyverbs
def test_rtr_rts_attrs_masks_psn_pairing_and_global_route(pv: SimpleNamespace) -> None:
    e = pv.e
    p = QPParams(gid_index=3, min_rnr_timer=12)
    side_a = {"qpn": 0x111, "psn": 0xABCDE, "lid": 0, "gid": GID_A, "mtu": e.IBV_MTU_4096}
    side_b = {"qpn": 0x222, "psn": 0x12345, "lid": 0, "gid": GID_B, "mtu": e.IBV_MTU_1024}
    # Each side's RTR uses the peer's info and its own PSN; RTS uses the peer's PSN.
    rtr_a, m_rtr = pp.rtr_attr(pv, p, side_a["psn"], side_b)
    rtr_b, _ = pp.rtr_attr(pv, p, side_b["psn"], side_a)
    rts_a, m_rts = pp.rts_attr(pv, p, side_b["psn"])
    rts_b, _ = pp.rts_attr(pv, p, side_a["psn"])
    assert m_rtr == (e.IBV_QP_STATE | e.IBV_QP_AV | e.IBV_QP_PATH_MTU | e.IBV_QP_DEST_QPN
                     | e.IBV_QP_RQ_PSN | e.IBV_QP_MAX_DEST_RD_ATOMIC | e.IBV_QP_MIN_RNR_TIMER)
    assert m_rts == (e.IBV_QP_STATE | e.IBV_QP_TIMEOUT | e.IBV_QP_RETRY_CNT | e.IBV_QP_RNR_RETRY
                     | e.IBV_QP_SQ_PSN | e.IBV_QP_MAX_QP_RD_ATOMIC)
    assert (rtr_a.qp_state, rts_a.qp_state) == (e.IBV_QPS_RTR, e.IBV_QPS_RTS)
    assert rtr_a.dest_qp_num == 0x222 and rtr_b.dest_qp_num == 0x111
    # PSN pairing: the receiver's rq_psn equals the sender's sq_psn, both directions.
    assert rtr_a.rq_psn == rts_b.sq_psn == side_a["psn"]
    assert rtr_b.rq_psn == rts_a.sq_psn == side_b["psn"]
    assert rtr_a.path_mtu == e.IBV_MTU_1024  # the smaller of ours and the peer's
    assert (rtr_a.min_rnr_timer, rtr_a.max_dest_rd_atomic) == (12, 1)
    assert (rts_a.timeout, rts_a.retry_cnt, rts_a.rnr_retry, rts_a.max_rd_atomic) == (14, 7, 7, 1)
    ah = rtr_a.ah_attr
    assert ah.is_global == 1 and str(ah.dgid) == GID_B and ah.sgid_index == 3 and ah.port_num == 1


@needs_pyverbs
def test_zero_gid_means_no_global_route(pv: SimpleNamespace) -> None:
    a, _ = pp.rtr_attr(pv, QPParams(), 1, {"qpn": 5, "psn": 2, "lid": 9, "gid": "0000:" * 7 + "0000"})
    assert a.ah_attr.is_global == 0 and a.ah_attr.dlid == 9


@needs_pyverbs
def test_work_requests(pv: SimpleNamespace) -> None:
    e = pv.e
    mr = SimpleNamespace(addr=0x10000, lkey=0x77, rkey=0x88, length=4096)
    r = pp.recv_wr(pv, 5, mr, 256, 128)
    assert (r.wr_id, r.num_sge) == (5, 1)
    s = pp.send_wr(pv, 6, mr, 512, 64, True)
    assert (s.wr_id, s.opcode, s.num_sge, s.send_flags) == (6, e.IBV_WR_SEND, 1, e.IBV_SEND_SIGNALED)
    sge = pv.SGE(mr.addr + 512, 64, mr.lkey)
    assert (sge.addr, sge.length, sge.lkey) == (0x10200, 64, 0x77)
    w = pp.send_wr(pv, 7, mr, 0, 8, False, e.IBV_WR_RDMA_WRITE, 0x2000, 0x99)
    assert w.opcode == e.IBV_WR_RDMA_WRITE and w.send_flags == 0


# -- the call-order fake ----------------------------------------------------------------------------

class FakeWorld:
    """Fakes of everything that needs a device, recording every call in order. Sends
    complete successfully at once; data is not moved (the fake is about call order)."""

    def __init__(self, pv: SimpleNamespace) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.qpn = 100
        world = self

        class Ctx:
            def __init__(self, name: str) -> None:
                world.log.append(("Context", name))

            def query_port(self, port: int) -> Any:
                return SimpleNamespace(lid=0, active_mtu=pv.e.IBV_MTU_1024)

            def query_gid(self, port: int, idx: int) -> Any:
                return pv.GID(GID_A)

            def close(self) -> None:
                world.log.append(("Context.close",))

        class PD:
            def __init__(self, ctx: Any) -> None:
                pass

            def close(self) -> None:
                pass

        class MR:
            def __init__(self, pd: Any, length: int, access: int, address: int) -> None:
                self.lkey, self.rkey, self.buf = 1, 2, address
                world.log.append(("MR", length, access))

            def close(self) -> None:
                pass

        class Chan:
            def __init__(self, ctx: Any) -> None:
                self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # rdma-core >= 57 style

            def get_cq_event(self, cq: Any) -> None:
                os.eventfd_read(self.fd)
                world.log.append(("get_cq_event", cq.n))

            def close(self) -> None:
                os.close(self.fd)

        class CQ:
            count = 0

            def __init__(self, ctx: Any, depth: int, cq_ctx: Any, ch: Chan, vec: int) -> None:
                CQ.count += 1
                self.n, self.ch, self.wcs = CQ.count, ch, []

            def req_notify(self) -> None:
                world.log.append(("req_notify", self.n))

            def ack_events(self, k: int) -> None:
                world.log.append(("ack_events", self.n, k))

            def poll(self, n: int) -> tuple[int, list[Any]]:
                world.log.append(("poll", self.n))
                out, self.wcs = self.wcs[:n], self.wcs[n:]
                return len(out), out

            def complete(self, wr_id: int, opcode: int, nbytes: int = 0) -> None:
                self.wcs.append(SimpleNamespace(wr_id=wr_id, status=0, opcode=opcode, byte_len=nbytes, qp_num=0))
                os.eventfd_write(self.ch.fd, 1)

            def close(self) -> None:
                pass

        class QP:
            def __init__(self, pd: Any, init: Any) -> None:
                world.qpn += 1
                self.qp_num, self.scq, self.state = world.qpn, init.scq, pv.e.IBV_QPS_RESET
                world.log.append(("QP", self.qp_num, init.qp_type))

            def modify(self, attr: Any, mask: int) -> None:
                self.state = attr.qp_state
                world.log.append(("modify", self.qp_num, attr.qp_state, mask))

            def post_recv(self, wr: Any) -> None:
                world.log.append(("post_recv", self.qp_num, self.state))

            def post_send(self, wr: Any) -> None:
                world.log.append(("post_send", self.qp_num, self.state))
                self.scq.complete(wr.wr_id, pv.e.IBV_WC_SEND)

            def close(self) -> None:
                world.log.append(("QP.close", self.qp_num))

        def init_attr(qp_type: int, scq: Any, rcq: Any, cap: Any, sq_sig_all: int) -> Any:
            # The real QPInitAttr wants real CQs: build it without them (so its fields
            # are still checked by pyverbs) and carry the fake CQs alongside.
            real = pv.QPInitAttr(qp_type=qp_type, cap=cap, sq_sig_all=sq_sig_all)
            return SimpleNamespace(qp_type=real.qp_type, scq=scq, rcq=rcq, cap=real.cap, real=real)

        self.pv = SimpleNamespace(**vars(pv))
        self.pv.QPInitAttr = init_attr
        self.pv.Context, self.pv.PD, self.pv.MR, self.pv.CompChannel, self.pv.CQ, self.pv.QP = Ctx, PD, MR, Chan, CQ, QP
        self.pv.get_device_list = lambda: [SimpleNamespace(name=b"fake0")]

    def calls(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.log if c[0] == name]


@needs_pyverbs
def test_fake_provider_state_discipline(pv: SimpleNamespace) -> None:
    w = FakeWorld(pv)
    e = pv.e
    dev = pp.PyverbsProvider(w.pv).open_device()
    cq = dev.create_cq(64)
    mr = dev.register(1 << 16, Access.LOCAL_WRITE)
    qp = dev.create_qp(cq, cq, QPCaps(8, 8))
    try:
        assert w.calls("Context") == [("Context", "fake0")]
        assert w.calls("MR")[0][2] == e.IBV_ACCESS_LOCAL_WRITE
        with pytest.raises(QPStateError):
            qp.post_recv(1, mr, 0, 64)  # RESET
        qp.to_init()
        qp.post_recv(1, mr, 0, 64)
        with pytest.raises(QPStateError):
            qp.post_send(2, mr, 0, 8)  # INIT: refused before reaching the verbs
        assert w.calls("post_send") == []
        info = qp.local_info([mr])
        assert info.fds == [] and info.info["gid"] == GID_A and info.info["mrs"][0]["rkey"] == 2
        qp.connect(SimpleNamespace(info={"provider": "pyverbs", "qpn": 7, "psn": 9, "lid": 0, "gid": GID_B}, fds=[]))
        mods = [(c[2], c[3]) for c in w.calls("modify")]
        assert [m[0] for m in mods] == [e.IBV_QPS_INIT, e.IBV_QPS_RTR, e.IBV_QPS_RTS]
        assert mods[1][1] & e.IBV_QP_AV and mods[2][1] & e.IBV_QP_SQ_PSN
        qp.post_send(3, mr, 0, 8)
        assert [c[2] for c in w.calls("post_send")] == [e.IBV_QPS_RTS]
        assert all(c[2] in (e.IBV_QPS_INIT, e.IBV_QPS_RTR, e.IBV_QPS_RTS) for c in w.calls("post_recv"))
        # CQ: the event is consumed and acked, the CQ re-armed, and only then drained.
        assert select.select([cq.fileno()], [], [], 0)[0]
        del w.log[:]
        wcs = cq.poll(16)
        assert [(x.wr_id, x.status, x.opcode) for x in wcs] == [(3, WCStatus.SUCCESS, WCOpcode.SEND)]
        assert [c[0] for c in w.log] == ["get_cq_event", "ack_events", "req_notify", "poll"]
        qp.to_error()
        assert w.calls("modify")[-1][2] == e.IBV_QPS_ERR
    finally:
        qp.close()
        cq.close()
        dev.close()


@needs_pyverbs
def test_fake_stack_posts_receives_before_ready_and_sends_only_in_rts(pv: SimpleNamespace) -> None:
    """The whole rdma stack over the fake: every receive of a QP is posted before its
    HELLO leaves, data is posted only in RTS, and every CQ drain follows a re-arm."""
    from transport.rdma.stack import RdmaStack

    w = FakeWorld(pv)
    stack = RdmaStack(pp.PyverbsProvider(w.pv), rx_chunks=4, tx_chunks=4, chunk_size=4096)
    d = tempfile.mkdtemp(prefix="amsgr-rdma-fake-")
    server = stack.listen(f"{d}/s.sock")
    try:
        client = stack.connect(server.address)
        assert client.is_connected() == 1
        hello_sent_at = len(w.log)  # the client's HELLO is on the wire now
        client_qpn = w.calls("QP")[0][1]
        recvs = [i for i, c in enumerate(w.log) if c[0] == "post_recv" and c[1] == client_qpn]
        assert len(recvs) == 4 + RdmaStack.CTRL_SLOTS and max(recvs) < hello_sent_at
        conn = None
        for _ in range(10):
            select.select([server.fileno()], [], [], 5)
            conn = server.accept()
            if conn is not None:
                break
        assert conn is not None
        server_qpn = w.calls("QP")[1][1]
        srv = [c for c in w.log if c[1:2] == (server_qpn,)]
        first_modify_rtr = next(i for i, c in enumerate(srv) if c[0] == "modify" and c[2] == pv.e.IBV_QPS_RTR)
        assert sum(1 for c in srv[:first_modify_rtr] if c[0] == "post_recv") == 4 + RdmaStack.CTRL_SLOTS
        with pytest.raises(BlockingIOError):
            conn.send([b"too early"])  # no ACK yet: the client's QP may not be in RTR
        for _ in range(10):
            select.select([client.fileno()], [], [], 5)
            try:
                n = client.send([b"x" * 100])
                break
            except BlockingIOError:
                continue
        assert n == 100
        assert [c[2] for c in w.calls("post_send")] == [pv.e.IBV_QPS_RTS]
        polls = [i for i, c in enumerate(w.log) if c[0] == "poll"]
        for i in polls:  # each drain is preceded by a re-arm of that CQ
            assert any(c[0] == "req_notify" and c[1] == w.log[i][1] for c in w.log[:i])
        conn.close()
        client.close()
    finally:
        server.close()
        stack.close()
        os.rmdir(d)


# -- real device ------------------------------------------------------------------------------------

@needs_pyverbs
@needs_device
def test_real_device_opens_and_registers() -> None:  # pragma: no cover - needs hardware
    dev = pp.PyverbsProvider().open_device()
    try:
        cq = dev.create_cq(16)
        mr = dev.register(1 << 21, Access.LOCAL_WRITE)
        qp = dev.create_qp(cq, cq, QPCaps(4, 4))
        qp.to_init()
        info = qp.local_info([mr])
        assert info.info["qpn"] == qp.qp_num
        qp.close()
        dev.deregister(mr)
        cq.close()
    finally:
        dev.close()


@needs_pyverbs
@needs_device
def test_real_device_loopback_rc_send() -> None:  # pragma: no cover - needs hardware
    from transport.rdma.verbs import PeerInfo
    dev = pp.PyverbsProvider().open_device()
    try:
        cq = dev.create_cq(16)
        mra, mrb = dev.register(4096, Access.LOCAL_WRITE), dev.register(4096, Access.LOCAL_WRITE)
        a, b = dev.create_qp(cq, cq, QPCaps(4, 4)), dev.create_qp(cq, cq, QPCaps(4, 4))
        a.to_init()
        b.to_init()
        b.post_recv(1, mrb, 0, 4096)
        ia, ib = a.local_info(), b.local_info()
        a.connect(PeerInfo(ib.info, []))
        b.connect(PeerInfo(ia.info, []))
        mra.buf[:4] = b"real"
        a.post_send(2, mra, 0, 4)
        got = []
        for _ in range(100):
            select.select([cq.fileno()], [], [], 0.1)
            got += cq.poll(8)
            if len(got) >= 2:
                break
        assert sorted(w.wr_id for w in got) == [1, 2] and all(w.ok for w in got)
        assert bytes(mrb.buf[:4]) == b"real"
        a.close()
        b.close()
        cq.close()
    finally:
        dev.close()
