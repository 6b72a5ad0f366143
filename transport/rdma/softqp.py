"""The emulated completion queues and queue pairs of softverbs: one NIC's queues.

A :class:`SoftQP` pushes completions into its CQs and a CQ drives its QPs' retries and
flushes: on hardware these are one device sharing its queues, and here they share
their private members in the same way (the model and its limits are in :mod:`.softverbs`).
"""


from __future__ import annotations

import errno
import mmap
import os
import random
import select
import time
from collections import deque

from ..hugepages import alloc_region
from ..timerfd import TimerFd
from .softmem import (
    CQE,
    LINE,
    QP_CLOSED,
    QP_HDR,
    QP_MAGIC,
    QP_VERSION,
    RQE,
    STATE_OFF,
    DeviceServices,
    PeerMR,
    RecordRing,
    SendWR,
    SoftMR,
    pow2,
)
from .verbs import (
    RNR_RETRY_INFINITE,
    RNR_TIMER_MS,
    Access,
    CompletionQueue,
    MemoryRegion,
    PeerInfo,
    QPCaps,
    QPParams,
    QPState,
    QPStateError,
    QueuePair,
    VerbsError,
    WCOpcode,
    WCStatus,
    WorkCompletion,
    check_transition,
)

__all__ = ["SoftCQ", "SoftQP"]


class SoftCQ(CompletionQueue):
    """A CQ: local completions in a deque, receive completions pulled from the RCQ rings
    of its QPs; ``fileno()`` is an epoll fd over the doorbell eventfd and peer pidfds."""

    def __init__(self, device: DeviceServices, depth: int = 256) -> None:
        self._dev = device
        self.depth = depth
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep = select.epoll()
        self._ep.register(self._efd, select.EPOLLIN)
        self._deque: deque[WorkCompletion] = deque()
        self._recv_qps: list[SoftQP] = []
        self._retry: set[SoftQP] = set()  # QPs with sends waiting for a retry timer
        self._flush_wait: set[SoftQP] = set()  # QPs in ERR waiting for a quiescent peer
        self._pidfds: dict[int, SoftQP] = {}
        self._timer: TimerFd | None = None
        self._closed = False

    def fileno(self) -> int:
        return self._ep.fileno()

    @property
    def doorbell_fd(self) -> int:
        return self._efd

    def _signal(self) -> None:
        os.eventfd_write(self._efd, 1)

    def _push(self, wc: WorkCompletion) -> None:
        if not self._deque:
            self._signal()
        self._deque.append(wc)

    def _watch_pid(self, pidfd: int, qp: SoftQP) -> None:
        self._pidfds[pidfd] = qp
        self._ep.register(pidfd, select.EPOLLIN)

    def _unwatch_pid(self, pidfd: int) -> None:
        if self._pidfds.pop(pidfd, None) is not None:
            try:
                self._ep.unregister(pidfd)
            except OSError:
                pass

    def poll(self, n: int = 32) -> list[WorkCompletion]:
        if self._closed:
            return []
        for fd, _ in self._ep.poll(0):
            if fd == self._efd:
                try:
                    os.eventfd_read(self._efd)
                except BlockingIOError:
                    pass
            elif fd in self._pidfds:
                self._pidfds[fd]._peer_gone()
            elif self._timer is not None and fd == self._timer.fd:
                self._timer.clear()
        if self._retry:
            for qp in list(self._retry):
                qp._progress_sends()
            self._arm_timer()
        if self._flush_wait:
            for qp in list(self._flush_wait):
                qp._try_flush_rq()
        for qp in self._recv_qps:
            qp._reap_rcq()
        out: list[WorkCompletion] = []
        while self._deque and len(out) < n:
            out.append(self._deque.popleft())
        if self._deque:
            self._signal()  # more than n: keep the fd readable
        return out

    def _arm_timer(self) -> None:
        delay = self.next_timeout()
        if delay is None:
            return
        if self._timer is None:
            self._timer = TimerFd()
            self._ep.register(self._timer.fd, select.EPOLLIN)
        self._timer.arm(delay)

    def next_timeout(self) -> float | None:
        due = [qp._pending[0].not_before for qp in self._retry if qp._pending]
        if not due:
            return None
        return max(0.0, min(due) - time.monotonic())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ep.close()
        os.close(self._efd)
        if self._timer is not None:
            self._timer.close()
        self._deque.clear()


class SoftQP(QueuePair):
    """An RC queue pair emulated over a shared QP region (see module docstring)."""

    def __init__(self, device: DeviceServices, send_cq: SoftCQ, recv_cq: SoftCQ,
                 caps: QPCaps, params: QPParams) -> None:
        self._dev, self._scq, self._rcq_cq = device, send_cq, recv_cq
        self.caps, self.params = caps, params
        self.qp_num = device.new_qpn()
        self.psn = random.getrandbits(24)
        self.state = QPState.RESET
        self._cap = pow2(caps.max_recv_wr)
        rq_bytes = RecordRing.nbytes(self._cap, RQE)
        size = LINE + rq_bytes + RecordRing.nbytes(self._cap, CQE)
        self._region = alloc_region(size, "amsgr-softqp", hugepages=False)
        m = self._region.map
        QP_HDR.pack_into(m, 0, QP_MAGIC, QP_VERSION, QPState.RESET, self.qp_num, os.getpid(),
                       params.min_rnr_timer, self._cap, 0)
        self._words = memoryview(m).cast("I")
        self._rq = RecordRing(m, LINE, self._cap, RQE)
        self._rcq = RecordRing(m, LINE + rq_bytes, self._cap, CQE)
        self._recv_outstanding = 0
        self._pending: deque[SendWR] = deque()
        self._connected = False
        self._peer_dead = False
        self._peer_map: mmap.mmap | None = None
        self._peer_words: memoryview | None = None
        self._peer_rq: RecordRing | None = None
        self._peer_rcq: RecordRing | None = None
        self._peer_efd = -1
        self._pidfd = -1
        self._peer_mrs: dict[int, PeerMR] = {}
        self._peer_by_rkey: dict[int, PeerMR] = {}
        self._peer_rnr_s = RNR_TIMER_MS[params.min_rnr_timer] / 1000.0
        self.peer_qpn = 0
        self.peer_psn = 0
        self.rq_psn = self.sq_psn = 0
        recv_cq._recv_qps.append(self)

    # -- state -------------------------------------------------------------------------
    def _set_state(self, new: QPState | int) -> None:
        if new != QP_CLOSED:
            check_transition(self.state, QPState(new))
            self.state = QPState(new)
        self._words[STATE_OFF // 4] = int(new)  # one 4-byte store (see RecordRing)

    def _peer_state(self) -> int:
        assert self._peer_words is not None
        return self._peer_words[STATE_OFF // 4]

    def _ring_peer(self) -> None:
        if self._peer_efd >= 0:
            try:
                os.eventfd_write(self._peer_efd, 1)
            except OSError:
                pass

    def to_init(self) -> None:
        self._set_state(QPState.INIT)

    def local_info(self, mrs: list[MemoryRegion] | None = None) -> PeerInfo:
        """Our half of the exchange. The returned fds are fresh duplicates owned by the
        caller; ``mrs`` are the regions the peer may target (default: all)."""
        if self.state == QPState.RESET:
            raise QPStateError("local_info needs the QP in INIT (call to_init first)")
        targets = self._dev.mrs() if mrs is None else mrs
        fds = [os.dup(self._region.fd), os.dup(self._rcq_cq.doorbell_fd)]
        descs = []
        for mr in targets:
            h = mr.handle
            if not isinstance(h, SoftMR) or h.device is not self._dev:
                raise VerbsError(errno.EINVAL, "memory region is not from this device")
            descs.append({"id": h.mr_id, "addr": mr.addr, "length": mr.length, "rkey": mr.rkey,
                          "access": int(mr.access), "size": h.region.size, "fd": len(fds)})
            fds.append(os.dup(h.region.fd))
        info = {"provider": "softverbs", "emulation": True, "qpn": self.qp_num, "psn": self.psn,
                "pid": os.getpid(), "gid": self._dev.gid, "rq_cap": self._cap,
                "min_rnr_timer": self.params.min_rnr_timer,
                "qp_region": {"fd": 0, "size": self._region.size}, "doorbell_fd": 1, "mrs": descs}
        return PeerInfo(info, fds)

    def connect(self, peer: PeerInfo) -> None:
        fds = list(peer.fds)
        keep: set[int] = set()
        try:
            if self.state != QPState.INIT:
                raise QPStateError(f"connect needs the QP in INIT, not {self.state.name}")
            info = peer.info
            if info.get("provider") != "softverbs":
                raise VerbsError(errno.EPROTO, f"peer provider {info.get('provider')!r} is not softverbs")
            if info.get("gid") != self._dev.gid:
                raise VerbsError(errno.EHOSTUNREACH, "softverbs peers must share one kernel (boot id differs)")
            reg = info["qp_region"]
            pm = mmap.mmap(fds[reg["fd"]], reg["size"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            magic, _v, _st, qpn, _pid, rnr, cap, _ = QP_HDR.unpack_from(pm, 0)
            if magic != QP_MAGIC or qpn != info["qpn"]:
                pm.close()
                raise VerbsError(errno.EPROTO, "peer QP region is not a softverbs QP")
            self._peer_map = pm
            self._peer_words = memoryview(pm).cast("I")
            rq_bytes = RecordRing.nbytes(cap, RQE)
            self._peer_rq = RecordRing(pm, LINE, cap, RQE)
            self._peer_rcq = RecordRing(pm, LINE + rq_bytes, cap, CQE)
            self._peer_rnr_s = RNR_TIMER_MS[rnr] / 1000.0
            self._peer_efd = fds[info["doorbell_fd"]]
            keep.add(self._peer_efd)
            for d in info["mrs"]:
                view, key = self._dev.map_peer(fds[d["fd"]], d["size"])
                pmr = PeerMR(d["id"], d["addr"], d["length"], d["rkey"], Access(d["access"]),
                              view[: d["length"]], key)
                self._peer_mrs[pmr.mr_id] = pmr
                self._peer_by_rkey[pmr.rkey] = pmr
            self.peer_qpn, self.peer_psn = info["qpn"], info["psn"]
            # The same pairing as ibverbs: our receive PSN is ours, our send PSN theirs.
            self.rq_psn, self.sq_psn = self.psn, self.peer_psn
            pid = int(info["pid"])
            if pid != os.getpid():
                try:
                    self._pidfd = os.pidfd_open(pid)
                except ProcessLookupError:
                    self._peer_dead = True
                except (AttributeError, OSError):
                    pass  # no pidfd (Linux < 5.3): the stack's side channel still sees EOF
                else:
                    for cq in {self._scq, self._rcq_cq}:
                        cq._watch_pid(self._pidfd, self)
            self._connected = True
            self._set_state(QPState.RTR)
            self._set_state(QPState.RTS)
        finally:
            for fd in fds:
                if fd not in keep:
                    os.close(fd)
        if self._peer_dead:
            self.to_error()

    # -- posting -----------------------------------------------------------------------
    def post_recv(self, wr_id: int, mr: MemoryRegion, offset: int, length: int) -> None:
        if self.state == QPState.RESET:
            raise QPStateError("post_recv in RESET")
        if self.state == QPState.ERR:
            self._rcq_cq._push(WorkCompletion(wr_id, WCStatus.WR_FLUSH_ERR, WCOpcode.RECV, 0, self.qp_num))
            return
        h = mr.handle
        if not isinstance(h, SoftMR) or h.device is not self._dev:
            raise VerbsError(errno.EINVAL, "memory region is not from this device")
        if self._recv_outstanding >= self.caps.max_recv_wr:
            raise VerbsError(errno.ENOMEM, "receive queue full")
        # Bounds and LOCAL_WRITE are checked by the delivering side (a NIC checks them
        # when data arrives, and reports LOC_PROT_ERR there).
        self._rq.push(wr_id, h.mr_id, length, offset)
        self._recv_outstanding += 1

    def _post(self, wr: SendWR) -> None:
        if self.state == QPState.ERR:
            self._scq._push(WorkCompletion(wr.wr_id, WCStatus.WR_FLUSH_ERR, wr.opcode, 0, self.qp_num))
            return
        if self.state != QPState.RTS:
            raise QPStateError(f"post_send needs RTS, QP is {self.state.name}")
        if len(self._pending) >= self.caps.max_send_wr:
            raise VerbsError(errno.ENOMEM, "send queue full")
        self._pending.append(wr)
        self._progress_sends()

    def post_send(self, wr_id: int, mr: MemoryRegion, offset: int, length: int,
                  signaled: bool = True) -> None:
        self._post(SendWR(wr_id, WCOpcode.SEND, mr, offset, length, signaled))

    def rdma_write(self, wr_id: int, mr: MemoryRegion, offset: int, length: int,
                   remote_addr: int, rkey: int, signaled: bool = True) -> None:
        self._post(SendWR(wr_id, WCOpcode.RDMA_WRITE, mr, offset, length, signaled, remote_addr, rkey))

    def rdma_read(self, wr_id: int, mr: MemoryRegion, offset: int, length: int,
                  remote_addr: int, rkey: int, signaled: bool = True) -> None:
        self._post(SendWR(wr_id, WCOpcode.RDMA_READ, mr, offset, length, signaled, remote_addr, rkey))

    # -- the emulated requester ----------------------------------------------------------
    def _complete(self, wr: SendWR, status: WCStatus, nbytes: int = 0) -> None:
        if status != WCStatus.SUCCESS or wr.signaled:
            self._scq._push(WorkCompletion(wr.wr_id, status, wr.opcode, nbytes, self.qp_num))

    def _fail(self, status: WCStatus) -> None:
        """Complete the head WR with ``status``; the requester QP goes to ERR (RC rule)."""
        wr = self._pending.popleft()
        self._complete(wr, status)
        self.to_error()

    def _local_ok(self, wr: SendWR) -> bool:
        h = wr.mr.handle
        return (isinstance(h, SoftMR) and h.device is self._dev and wr.offset >= 0
                and wr.length >= 0 and wr.offset + wr.length <= wr.mr.length)

    def _remote(self, wr: SendWR, need: Access) -> memoryview | None:
        pmr = self._peer_by_rkey.get(wr.rkey)
        if pmr is None or not (pmr.access & need):
            return None
        off = wr.remote_addr - pmr.iova
        if off < 0 or wr.length < 0 or off + wr.length > pmr.length:
            return None
        return pmr.view[off: off + wr.length]

    def _progress_sends(self) -> None:
        now = time.monotonic()
        delivered = False
        while self._pending and self.state == QPState.RTS:
            wr = self._pending[0]
            if wr.not_before > now:
                break
            if not self._local_ok(wr):
                self._fail(WCStatus.LOC_PROT_ERR)
                break
            peer = QP_CLOSED if self._peer_dead else self._peer_state()
            if peer in (QPState.ERR, QPState.RESET, QP_CLOSED):
                # A real requester would time out retry_cnt times; the emulation knows
                # the responder is gone and reports the same status at once.
                self._fail(WCStatus.RETRY_EXC_ERR)
                break
            if peer == QPState.INIT:  # a responder not yet in RTR drops packets
                if wr.retries >= self.params.retry_cnt:
                    self._fail(WCStatus.RETRY_EXC_ERR)
                    break
                wr.retries += 1
                self._dev.stats["retry"] += 1
                wr.not_before = now + 4.096e-6 * (1 << self.params.timeout)
                break
            src = wr.mr.buf[wr.offset: wr.offset + wr.length]
            if wr.opcode == WCOpcode.SEND:
                assert self._peer_rq is not None and self._peer_rcq is not None
                ent = self._peer_rq.pop()
                if ent is None:  # receiver not ready
                    self._dev.stats["rnr"] += 1
                    rnr = self.params.rnr_retry
                    if rnr != RNR_RETRY_INFINITE and wr.rnr_tries >= rnr:
                        self._fail(WCStatus.RNR_RETRY_EXC_ERR)
                        break
                    wr.rnr_tries += 1
                    wr.not_before = now + self._peer_rnr_s
                    break
                r_wr_id, mr_id, r_len, r_off = ent
                tgt = self._peer_mrs.get(mr_id)
                if tgt is None or not (tgt.access & Access.LOCAL_WRITE) or r_off + r_len > tgt.length:
                    self._peer_rcq.push(r_wr_id, WCStatus.LOC_PROT_ERR, WCOpcode.RECV, 0, 0)
                    self._ring_peer()
                    self._fail(WCStatus.REM_OP_ERR)
                    break
                if wr.length > r_len:
                    self._peer_rcq.push(r_wr_id, WCStatus.LOC_LEN_ERR, WCOpcode.RECV, 0, 0)
                    self._ring_peer()
                    self._fail(WCStatus.REM_INV_REQ_ERR)
                    break
                tgt.view[r_off: r_off + wr.length] = src
                self._peer_rcq.push(r_wr_id, WCStatus.SUCCESS, WCOpcode.RECV, wr.length, 0)
                delivered = True
            elif wr.opcode == WCOpcode.RDMA_WRITE:
                dst = self._remote(wr, Access.REMOTE_WRITE)
                if dst is None:
                    self._fail(WCStatus.REM_ACCESS_ERR)
                    break
                dst[:] = src
            else:  # RDMA_READ
                rsrc = self._remote(wr, Access.REMOTE_READ)
                if rsrc is None:
                    self._fail(WCStatus.REM_ACCESS_ERR)
                    break
                wr.mr.buf[wr.offset: wr.offset + wr.length] = rsrc
            self._pending.popleft()
            self._complete(wr, WCStatus.SUCCESS, wr.length)
        if delivered:
            self._ring_peer()
        if self._pending and self.state == QPState.RTS:
            if self not in self._scq._retry:
                self._scq._retry.add(self)
                self._scq._arm_timer()
        else:
            self._scq._retry.discard(self)

    # -- completions, errors, flush ------------------------------------------------------
    def _reap_rcq(self) -> None:
        while (ent := self._rcq.pop()) is not None:
            wr_id, status, opcode, nbytes, _ = ent
            self._recv_outstanding -= 1
            self._rcq_cq._push(WorkCompletion(wr_id, WCStatus(status), WCOpcode(opcode), nbytes, self.qp_num))
            if status != WCStatus.SUCCESS and self.state not in (QPState.ERR, QPState.RESET):
                self.to_error()

    def _try_flush_rq(self) -> None:
        """Flush posted receives, but only once the peer can no longer consume them
        (dead, in ERR, or destroyed): the RQ head then has a single writer again."""
        quiet = (not self._connected or self._peer_dead
                 or self._peer_state() in (QPState.ERR, QPState.RESET, QP_CLOSED))
        if not quiet:
            self._rcq_cq._flush_wait.add(self)
            return
        self._rcq_cq._flush_wait.discard(self)
        self._reap_rcq()  # completions the peer produced before it stopped come first
        while (ent := self._rq.pop()) is not None:
            self._recv_outstanding -= 1
            self._rcq_cq._push(WorkCompletion(ent[0], WCStatus.WR_FLUSH_ERR, WCOpcode.RECV, 0, self.qp_num))

    def to_error(self) -> None:
        if self.state == QPState.ERR:
            return
        self._set_state(QPState.ERR)
        while self._pending:
            wr = self._pending.popleft()
            self._scq._push(WorkCompletion(wr.wr_id, WCStatus.WR_FLUSH_ERR, wr.opcode, 0, self.qp_num))
        self._scq._retry.discard(self)
        self._try_flush_rq()
        self._ring_peer()  # a peer waiting to flush its own receives re-checks our state

    def _peer_gone(self) -> None:
        self._peer_dead = True
        self._drop_pidfd()
        if self.state in (QPState.INIT, QPState.RTR, QPState.RTS):
            self.to_error()
        else:
            self._try_flush_rq()

    def _drop_pidfd(self) -> None:
        if self._pidfd >= 0:
            for cq in {self._scq, self._rcq_cq}:
                cq._unwatch_pid(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    @property
    def peer_alive(self) -> bool:
        return not self._peer_dead

    def close(self) -> None:
        if self._region.fd < 0:
            return
        self._set_state(QP_CLOSED)
        self._ring_peer()
        self._drop_pidfd()
        for cq in {self._scq, self._rcq_cq}:
            cq._retry.discard(self)
            cq._flush_wait.discard(self)
        if self in self._rcq_cq._recv_qps:
            self._rcq_cq._recv_qps.remove(self)
        self._pending.clear()
        if self._peer_efd >= 0:
            os.close(self._peer_efd)
            self._peer_efd = -1
        for pmr in self._peer_mrs.values():
            pmr.view.release()
            self._dev.unmap_peer(pmr.key)
        self._peer_mrs.clear()
        self._peer_by_rkey.clear()
        for ring in (self._peer_rq, self._peer_rcq, self._rq, self._rcq):
            if ring is not None:
                ring.release()
        self._peer_rq = self._peer_rcq = None
        if self._peer_words is not None:
            self._peer_words.release()
            self._peer_words = None
        if self._peer_map is not None:
            self._peer_map.close()
            self._peer_map = None
        self._rq = self._rcq = None  # type: ignore[assignment]
        self._words.release()
        self._region.close()
