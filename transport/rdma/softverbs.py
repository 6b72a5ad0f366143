"""``softverbs``: the verbs interface over shared memory between processes — EMULATION.

Nothing here is RDMA. It exists so the stack above it, and its error paths, run in CI on
machines without an RDMA device (shared/notes/rdma.md §5). Results obtained on it are
labelled *emulation* everywhere.

Model ("the sender's process plays both NICs"):

* A memory region is a memfd (hugepages when available, via ``alloc_region``); the
  peer receives its fd by SCM_RIGHTS in the side-channel exchange and maps it. Its
  ``addr`` is a synthetic IOVA (``mr_id << 40``) so remote addresses can be checked.
* Each QP owns a small QP region holding its state word and two SPSC rings:
  the **RQ** (receives it posted; producer: owner, consumer: the peer's sender) and the
  **RCQ** (receive completions; producer: the peer's sender, consumer: owner). A send
  pops the peer's RQ, copies into the posted buffer, pushes an RCQ entry and rings the
  peer's CQ eventfd: in-order delivery falls out of a single producer per QP.
* RC semantics emulated explicitly: empty RQ -> receiver-not-ready, retried after the
  *responder's* ``min_rnr_timer`` up to ``rnr_retry`` times (7 = forever), then
  RNR_RETRY_EXC_ERR and the QP goes to ERR; peer QP in ERR or destroyed -> RETRY_EXC_ERR;
  one-sided write/read checks rkey, bounds and access flags (REM_ACCESS_ERR) and needs
  no action by the target's CPU; a local error moves the QP to ERR and flushes every
  outstanding WR with WR_FLUSH_ERR. Peer death is seen through a pidfd that sits in the
  CQ's epoll set, so a dead peer wakes ``CompletionQueue.fileno()``.
* A NIC flushes posted receives the moment its QP enters ERR. Here the peer's sender
  may be popping that RQ at that instant, so the flush waits until the peer is quiet
  (dead, in ERR, or destroyed; each rings our doorbell) - never two completions for one
  receive, at the price of flush completions that can come later than on hardware.
* Timing is not emulated: delivery is synchronous inside ``post_send``; a send waiting
  on RNR or on a responder still in INIT is retried when its timer (a timerfd in the
  CQ's epoll set) fires and the CQ is polled.

Not emulated (see shared/notes/rdma.md §5.3): CQ overrun (completions queue without
bound), MTU segmentation, retry/ACK timing of a wire, memory pinning and
RLIMIT_MEMLOCK, regions registered after ``local_info`` (the peer never maps them: a
receive or one-sided access into one fails with LOC_PROT_ERR / REM_ACCESS_ERR), and
peers on other hosts (softverbs needs one kernel: the boot id is its GID).

Memory ordering: each ring index and state word has one writer and is accessed as one
aligned 8- or 4-byte load/store through ``memoryview.cast`` (never ``struct.pack_into``,
which zero-fills first: a peer could read 0 mid-update). A producer writes the slot
before the tail and a consumer reads the tail before the slot; CPython issues these in
program order and x86-64 (TSO) keeps store order, which is all SPSC rings need.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import random
import select
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..hugepages import Region, alloc_region
from ..timerfd import TimerFd
from .verbs import (
    RNR_RETRY_INFINITE,
    RNR_TIMER_MS,
    Access,
    CompletionQueue,
    Device,
    MemoryRegion,
    PeerInfo,
    Provider,
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

__all__ = ["EMULATION", "SoftCQ", "SoftDevice", "SoftQP", "SoftVerbsProvider"]

#: Every result obtained on this provider is an emulation of RDMA, not RDMA.
EMULATION = True

_MAGIC = 0x51564253  # "SBVQ"
_VERSION = 1
_CLOSED = 0xFF  # state word of a destroyed QP (not an ibverbs state)
_HDR = struct.Struct("<IIIIIIII")  # magic version state qpn pid min_rnr_timer rq_cap pad
_STATE_OFF = 8
_U64 = struct.Struct("<Q")
_RQE = struct.Struct("<QIIQ")  # wr_id, mr_id, length, offset
_CQE = struct.Struct("<QIIII")  # wr_id, status, opcode, byte_len, pad
_LINE = 64
_IOVA_SHIFT = 40


def _boot_id() -> str:
    """Peers must share memory, hence one kernel: the boot id plays the GID's role."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:  # pragma: no cover - every Linux has it
        return "unknown-boot"


class _Ring:
    """SPSC ring of fixed-size records in a shared mapping; indices grow without wrap.

    Head and tail are read and written through ``memoryview.cast("Q")``: one 8-byte
    load or store. ``struct.pack_into`` zero-fills its target before copying, so a
    peer polling an index written that way can read 0 mid-update (measured here).
    """

    def __init__(self, buf: mmap.mmap, base: int, cap: int, rec: struct.Struct) -> None:
        self._buf, self._cap, self._rec = buf, cap, rec
        self._q = memoryview(buf).cast("Q")
        self._hi, self._ti = base // 8, (base + _LINE) // 8
        self._slots = base + 2 * _LINE

    @staticmethod
    def nbytes(cap: int, rec: struct.Struct) -> int:
        return 2 * _LINE + (cap * rec.size + _LINE - 1) // _LINE * _LINE

    def _head(self) -> int:
        return self._q[self._hi]

    def _tail(self) -> int:
        return self._q[self._ti]

    def push(self, *values: Any) -> bool:
        tail = self._q[self._ti]
        if tail - self._q[self._hi] >= self._cap:
            return False
        self._rec.pack_into(self._buf, self._slots + (tail % self._cap) * self._rec.size, *values)
        self._q[self._ti] = tail + 1  # publish after the slot
        return True

    def pop(self) -> tuple[Any, ...] | None:
        head = self._q[self._hi]
        if head == self._q[self._ti]:
            return None
        rec = self._rec.unpack_from(self._buf, self._slots + (head % self._cap) * self._rec.size)
        self._q[self._hi] = head + 1
        return rec

    def release(self) -> None:
        self._q.release()

    def __len__(self) -> int:
        return self._q[self._ti] - self._q[self._hi]


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class _SoftMR:
    mr_id: int
    region: Region
    device: SoftDevice


@dataclass
class _PeerMR:
    mr_id: int
    iova: int
    length: int
    rkey: int
    access: Access
    view: memoryview
    key: tuple[int, int]


@dataclass
class _SendWR:
    wr_id: int
    opcode: WCOpcode
    mr: MemoryRegion
    offset: int
    length: int
    signaled: bool
    remote_addr: int = 0
    rkey: int = 0
    rnr_tries: int = 0
    retries: int = 0
    not_before: float = 0.0


class SoftCQ(CompletionQueue):
    """A CQ: local completions in a deque, receive completions pulled from the RCQ rings
    of its QPs; ``fileno()`` is an epoll fd over the doorbell eventfd and peer pidfds."""

    def __init__(self, device: SoftDevice, depth: int = 256) -> None:
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

    def __init__(self, device: SoftDevice, send_cq: SoftCQ, recv_cq: SoftCQ,
                 caps: QPCaps, params: QPParams) -> None:
        self._dev, self._scq, self._rcq_cq = device, send_cq, recv_cq
        self.caps, self.params = caps, params
        self.qp_num = device._new_qpn()
        self.psn = random.getrandbits(24)
        self.state = QPState.RESET
        self._cap = _pow2(caps.max_recv_wr)
        rq_bytes = _Ring.nbytes(self._cap, _RQE)
        size = _LINE + rq_bytes + _Ring.nbytes(self._cap, _CQE)
        self._region = alloc_region(size, "amsgr-softqp", hugepages=False)
        m = self._region.map
        _HDR.pack_into(m, 0, _MAGIC, _VERSION, QPState.RESET, self.qp_num, os.getpid(),
                       params.min_rnr_timer, self._cap, 0)
        self._words = memoryview(m).cast("I")
        self._rq = _Ring(m, _LINE, self._cap, _RQE)
        self._rcq = _Ring(m, _LINE + rq_bytes, self._cap, _CQE)
        self._recv_outstanding = 0
        self._pending: deque[_SendWR] = deque()
        self._connected = False
        self._peer_dead = False
        self._peer_map: mmap.mmap | None = None
        self._peer_words: memoryview | None = None
        self._peer_rq: _Ring | None = None
        self._peer_rcq: _Ring | None = None
        self._peer_efd = -1
        self._pidfd = -1
        self._peer_mrs: dict[int, _PeerMR] = {}
        self._peer_by_rkey: dict[int, _PeerMR] = {}
        self._peer_rnr_s = RNR_TIMER_MS[params.min_rnr_timer] / 1000.0
        self.peer_qpn = 0
        self.peer_psn = 0
        self.rq_psn = self.sq_psn = 0
        recv_cq._recv_qps.append(self)

    # -- state -------------------------------------------------------------------------
    def _set_state(self, new: QPState | int) -> None:
        if new != _CLOSED:
            check_transition(self.state, QPState(new))
            self.state = QPState(new)
        self._words[_STATE_OFF // 4] = int(new)  # one 4-byte store (see _Ring)

    def _peer_state(self) -> int:
        assert self._peer_words is not None
        return self._peer_words[_STATE_OFF // 4]

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
            if not isinstance(h, _SoftMR) or h.device is not self._dev:
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
            magic, _v, _st, qpn, _pid, rnr, cap, _ = _HDR.unpack_from(pm, 0)
            if magic != _MAGIC or qpn != info["qpn"]:
                pm.close()
                raise VerbsError(errno.EPROTO, "peer QP region is not a softverbs QP")
            self._peer_map = pm
            self._peer_words = memoryview(pm).cast("I")
            rq_bytes = _Ring.nbytes(cap, _RQE)
            self._peer_rq = _Ring(pm, _LINE, cap, _RQE)
            self._peer_rcq = _Ring(pm, _LINE + rq_bytes, cap, _CQE)
            self._peer_rnr_s = RNR_TIMER_MS[rnr] / 1000.0
            self._peer_efd = fds[info["doorbell_fd"]]
            keep.add(self._peer_efd)
            for d in info["mrs"]:
                view, key = self._dev._map_peer(fds[d["fd"]], d["size"])
                pmr = _PeerMR(d["id"], d["addr"], d["length"], d["rkey"], Access(d["access"]),
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
        if not isinstance(h, _SoftMR) or h.device is not self._dev:
            raise VerbsError(errno.EINVAL, "memory region is not from this device")
        if self._recv_outstanding >= self.caps.max_recv_wr:
            raise VerbsError(errno.ENOMEM, "receive queue full")
        # Bounds and LOCAL_WRITE are checked by the delivering side (a NIC checks them
        # when data arrives, and reports LOC_PROT_ERR there).
        self._rq.push(wr_id, h.mr_id, length, offset)
        self._recv_outstanding += 1

    def _post(self, wr: _SendWR) -> None:
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
        self._post(_SendWR(wr_id, WCOpcode.SEND, mr, offset, length, signaled))

    def rdma_write(self, wr_id: int, mr: MemoryRegion, offset: int, length: int,
                   remote_addr: int, rkey: int, signaled: bool = True) -> None:
        self._post(_SendWR(wr_id, WCOpcode.RDMA_WRITE, mr, offset, length, signaled, remote_addr, rkey))

    def rdma_read(self, wr_id: int, mr: MemoryRegion, offset: int, length: int,
                  remote_addr: int, rkey: int, signaled: bool = True) -> None:
        self._post(_SendWR(wr_id, WCOpcode.RDMA_READ, mr, offset, length, signaled, remote_addr, rkey))

    # -- the emulated requester ----------------------------------------------------------
    def _complete(self, wr: _SendWR, status: WCStatus, nbytes: int = 0) -> None:
        if status != WCStatus.SUCCESS or wr.signaled:
            self._scq._push(WorkCompletion(wr.wr_id, status, wr.opcode, nbytes, self.qp_num))

    def _fail(self, status: WCStatus) -> None:
        """Complete the head WR with ``status``; the requester QP goes to ERR (RC rule)."""
        wr = self._pending.popleft()
        self._complete(wr, status)
        self.to_error()

    def _local_ok(self, wr: _SendWR) -> bool:
        h = wr.mr.handle
        return (isinstance(h, _SoftMR) and h.device is self._dev and wr.offset >= 0
                and wr.length >= 0 and wr.offset + wr.length <= wr.mr.length)

    def _remote(self, wr: _SendWR, need: Access) -> memoryview | None:
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
            peer = _CLOSED if self._peer_dead else self._peer_state()
            if peer in (QPState.ERR, QPState.RESET, _CLOSED):
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
                 or self._peer_state() in (QPState.ERR, QPState.RESET, _CLOSED))
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
        self._set_state(_CLOSED)
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
            self._dev._unmap_peer(pmr.key)
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


class SoftDevice(Device):
    """One emulated device and protection domain per process (or per stack)."""

    emulated = True

    def __init__(self, name: str = "softverbs0") -> None:
        self.name = name
        self.gid = _boot_id()
        self._mrs: dict[int, MemoryRegion] = {}
        self._mr_ids = itertools.count(1)
        self._qpn = itertools.count(random.randrange(1, 1 << 23))
        self._peer_maps: dict[tuple[int, int], list[Any]] = {}  # (dev, ino) -> [mmap, view, refs]
        #: Counters of emulated NIC events: receiver-not-ready and transport retries.
        self.stats = {"rnr": 0, "retry": 0}
        self._closed = False

    def _new_qpn(self) -> int:
        return next(self._qpn) & 0xFFFFFF or 1

    def mrs(self) -> list[MemoryRegion]:
        return list(self._mrs.values())

    def register(self, size: int, access: Access = Access.LOCAL_WRITE,
                 hugepages: bool = True) -> MemoryRegion:
        region = alloc_region(size, "amsgr-softmr", hugepages=hugepages)
        mr_id = next(self._mr_ids)
        lkey = random.getrandbits(32)
        rkey = (lkey ^ random.getrandbits(31) ^ 1) & 0xFFFFFFFF  # never equal to lkey
        mr = MemoryRegion(addr=mr_id << _IOVA_SHIFT, length=size, lkey=lkey, rkey=rkey,
                          access=Access(access), buf=memoryview(region.map)[:size],
                          hugetlb=region.hugetlb, handle=_SoftMR(mr_id, region, self))
        self._mrs[mr_id] = mr
        return mr

    def deregister(self, mr: MemoryRegion) -> None:
        h = mr.handle
        if isinstance(h, _SoftMR) and self._mrs.pop(h.mr_id, None) is not None:
            mr.buf.release()
            h.region.close()

    def _map_peer(self, fd: int, size: int) -> tuple[memoryview, tuple[int, int]]:
        # A peer sends the same region with every connection; map it once per process.
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        ent = self._peer_maps.get(key)
        if ent is None:
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            ent = self._peer_maps[key] = [m, memoryview(m), 0]
        ent[2] += 1
        return ent[1], key

    def _unmap_peer(self, key: tuple[int, int]) -> None:
        ent = self._peer_maps.get(key)
        if ent is None:
            return
        ent[2] -= 1
        if ent[2] == 0:
            del self._peer_maps[key]
            self._drop_map(ent)

    @staticmethod
    def _drop_map(ent: list[Any]) -> None:
        try:
            ent[1].release()
            ent[0].close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with it

    def create_cq(self, depth: int = 256) -> SoftCQ:
        return SoftCQ(self, depth)

    def create_qp(self, send_cq: CompletionQueue, recv_cq: CompletionQueue,
                  caps: QPCaps = QPCaps(), params: QPParams = QPParams()) -> SoftQP:
        if not isinstance(send_cq, SoftCQ) or not isinstance(recv_cq, SoftCQ):
            raise VerbsError(errno.EINVAL, "softverbs QPs need softverbs CQs")
        return SoftQP(self, send_cq, recv_cq, caps, params)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for mr in list(self._mrs.values()):
            self.deregister(mr)
        for ent in self._peer_maps.values():
            self._drop_map(ent)
        self._peer_maps.clear()


class SoftVerbsProvider(Provider):
    """Always available; every device it opens is an EMULATION."""

    name = "softverbs"
    emulated = True

    def open_device(self, name: str | None = None) -> SoftDevice:
        return SoftDevice(name or "softverbs0")
