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
from typing import Any

from ..hugepages import alloc_region
from .softmem import (
    IOVA_SHIFT,
    SoftMR,
    boot_id,
)
from .softqp import SoftCQ, SoftQP
from .verbs import (
    Access,
    CompletionQueue,
    Device,
    MemoryRegion,
    Provider,
    QPCaps,
    QPParams,
    VerbsError,
)

__all__ = ["EMULATION", "SoftCQ", "SoftDevice", "SoftQP", "SoftVerbsProvider"]

#: Every result obtained on this provider is an emulation of RDMA, not RDMA.
EMULATION = True

class SoftDevice(Device):
    """One emulated device and protection domain per process (or per stack)."""

    emulated = True

    def __init__(self, name: str = "softverbs0") -> None:
        self.name = name
        self.gid = boot_id()
        self._mrs: dict[int, MemoryRegion] = {}
        self._mr_ids = itertools.count(1)
        self._qpn = itertools.count(random.randrange(1, 1 << 23))
        self._peer_maps: dict[tuple[int, int], list[Any]] = {}  # (dev, ino) -> [mmap, view, refs]
        #: Counters of emulated NIC events: receiver-not-ready and transport retries.
        self.stats = {"rnr": 0, "retry": 0}
        self._closed = False

    def new_qpn(self) -> int:
        """A fresh 24-bit QP number (for a QP of this device)."""
        return next(self._qpn) & 0xFFFFFF or 1

    def mrs(self) -> list[MemoryRegion]:
        return list(self._mrs.values())

    def register(self, size: int, access: Access = Access.LOCAL_WRITE,
                 hugepages: bool = True) -> MemoryRegion:
        region = alloc_region(size, "amsgr-softmr", hugepages=hugepages)
        mr_id = next(self._mr_ids)
        lkey = random.getrandbits(32)
        rkey = (lkey ^ random.getrandbits(31) ^ 1) & 0xFFFFFFFF  # never equal to lkey
        mr = MemoryRegion(addr=mr_id << IOVA_SHIFT, length=size, lkey=lkey, rkey=rkey,
                          access=Access(access), buf=memoryview(region.map)[:size],
                          hugetlb=region.hugetlb, handle=SoftMR(mr_id, region, self))
        self._mrs[mr_id] = mr
        return mr

    def deregister(self, mr: MemoryRegion) -> None:
        h = mr.handle
        if isinstance(h, SoftMR) and self._mrs.pop(h.mr_id, None) is not None:
            mr.buf.release()
            h.region.close()

    def map_peer(self, fd: int, size: int) -> tuple[memoryview, tuple[int, int]]:
        """Map a peer's region (an fd from the side channel); returns (view, key)."""
        # A peer sends the same region with every connection; map it once per process.
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        ent = self._peer_maps.get(key)
        if ent is None:
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            ent = self._peer_maps[key] = [m, memoryview(m), 0]
        ent[2] += 1
        return ent[1], key

    def unmap_peer(self, key: tuple[int, int]) -> None:
        """Drop one reference to a mapping from :meth:`map_peer`."""
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
