"""The narrow, verbs-shaped provider interface the RDMA stack is written against.

Only what the stack needs from ibverbs (shared/notes/rdma.md §5.1): open a device,
register memory (MR with lkey/rkey/addr), completion queues with ``poll(n)`` and a
pollable ``fileno()``, RC queue pairs with ``post_send`` / ``post_recv`` / one-sided
``rdma_write`` / ``rdma_read``, ``local_info()`` for the side channel and ``connect()``.

Two providers implement it: ``softverbs`` (shared memory between processes, an
EMULATION of RC semantics, always available) and ``pyverbs`` (real libibverbs, only when
a device is listed). Numeric values of states, statuses, opcodes and access flags are
ibverbs' own (``infiniband/verbs.h``) so completions read the same from either.
"""

from __future__ import annotations

import abc
import enum
import errno
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LEGAL_TRANSITIONS",
    "RNR_RETRY_INFINITE",
    "RNR_TIMER_MS",
    "Access",
    "CompletionQueue",
    "Device",
    "MemoryRegion",
    "NoDeviceError",
    "PeerInfo",
    "Provider",
    "QPCaps",
    "QPParams",
    "QPState",
    "QPStateError",
    "QueuePair",
    "VerbsError",
    "WCOpcode",
    "WCStatus",
    "WorkCompletion",
    "check_transition",
]


class Access(enum.IntFlag):
    """``ibv_access_flags``."""

    NONE = 0
    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4


class QPState(enum.IntEnum):
    """``ibv_qp_state`` (SQD/SQE are not used by an RC message transport)."""

    RESET = 0
    INIT = 1
    RTR = 2
    RTS = 3
    ERR = 6


class WCStatus(enum.IntEnum):
    """``ibv_wc_status`` values a transport can meet."""

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_EEC_OP_ERR = 3
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    MW_BIND_ERR = 6
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    LOC_RDD_VIOL_ERR = 14
    REM_INV_RD_REQ_ERR = 15
    REM_ABORT_ERR = 16
    INV_EECN_ERR = 17
    INV_EEC_STATE_ERR = 18
    FATAL_ERR = 19
    RESP_TIMEOUT_ERR = 20
    GENERAL_ERR = 21


class WCOpcode(enum.IntEnum):
    """``ibv_wc_opcode``."""

    SEND = 0
    RDMA_WRITE = 1
    RDMA_READ = 2
    RECV = 128


#: RESET->INIT->RTR->RTS, any state -> ERR or RESET (ibv_modify_qp(3), IB spec 10.3.1).
LEGAL_TRANSITIONS: dict[QPState, frozenset[QPState]] = {
    QPState.RESET: frozenset({QPState.INIT, QPState.RESET, QPState.ERR}),
    QPState.INIT: frozenset({QPState.INIT, QPState.RTR, QPState.RESET, QPState.ERR}),
    QPState.RTR: frozenset({QPState.RTS, QPState.RESET, QPState.ERR}),
    QPState.RTS: frozenset({QPState.RTS, QPState.RESET, QPState.ERR}),
    QPState.ERR: frozenset({QPState.RESET, QPState.ERR}),
}

#: The RNR NAK timer encoding of IB spec table 45 (index -> milliseconds).
RNR_TIMER_MS: tuple[float, ...] = (
    655.36, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32, 0.48, 0.64,
    0.96, 1.28, 1.92, 2.56, 3.84, 5.12, 7.68, 10.24, 15.36, 20.48, 30.72, 40.96,
    61.44, 81.92, 122.88, 163.84, 245.76, 327.68, 491.52,
)
#: rnr_retry == 7 means "retry forever" in IB.
RNR_RETRY_INFINITE = 7


class VerbsError(OSError):
    """A verb was refused (bad state, queue full, bad argument); ``errno`` says which."""


class QPStateError(VerbsError):
    """An illegal QP state transition, or a verb posted in a state that forbids it."""

    def __init__(self, msg: str) -> None:
        super().__init__(errno.EINVAL, msg)


class NoDeviceError(VerbsError):
    """No RDMA device can be used; the message carries the errno from discovery."""


def check_transition(old: QPState, new: QPState) -> None:
    """Raise :class:`QPStateError` unless ``old -> new`` is a legal QP transition."""
    if new not in LEGAL_TRANSITIONS[old]:
        raise QPStateError(f"illegal QP transition {old.name} -> {new.name}")


@dataclass(frozen=True)
class WorkCompletion:
    """One ``ibv_wc``: which WR finished, how, and how many bytes arrived."""

    wr_id: int
    status: WCStatus
    opcode: WCOpcode
    byte_len: int = 0
    qp_num: int = 0

    @property
    def ok(self) -> bool:
        return self.status == WCStatus.SUCCESS


@dataclass
class MemoryRegion:
    """A registered region. ``addr`` is the address peers and SGEs use (an IOVA on
    softverbs), ``buf`` this process's view of the bytes."""

    addr: int
    length: int
    lkey: int
    rkey: int
    access: Access
    buf: memoryview = field(repr=False)
    hugetlb: bool = False
    handle: Any = field(default=None, repr=False)  # provider-private

    def remote_desc(self) -> dict[str, int]:
        """What a peer needs for one-sided access: {addr, rkey, length}."""
        return {"addr": self.addr, "rkey": self.rkey, "length": self.length}


@dataclass(frozen=True)
class QPCaps:
    """Queue depths of one RC QP (``ibv_qp_cap``; one SGE per WR)."""

    max_send_wr: int = 64
    max_recv_wr: int = 64


@dataclass(frozen=True)
class QPParams:
    """Connection attributes (Ceph's defaults: MTU 1024, timeout 14, retry 7, rnr 7)."""

    path_mtu: int = 3  # IBV_MTU_1024
    timeout: int = 14
    retry_cnt: int = 7
    rnr_retry: int = RNR_RETRY_INFINITE
    min_rnr_timer: int = 12  # 0.64 ms
    max_rd_atomic: int = 1
    max_dest_rd_atomic: int = 1
    access: Access = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ
    port_num: int = 1
    gid_index: int = 0
    pkey_index: int = 0


@dataclass
class PeerInfo:
    """What one side sends the other over the side channel: JSON-able ``info`` plus fds
    (softverbs passes its regions and doorbell by SCM_RIGHTS; pyverbs passes none).
    The receiver of a PeerInfo owns its fds."""

    info: dict[str, Any]
    fds: list[int] = field(default_factory=list)


class CompletionQueue(abc.ABC):
    """A CQ: ``poll(n)`` returns up to n completions; ``fileno()`` is readable when a
    poll may return something (call ``req_notify`` before draining, as with ibverbs)."""

    @abc.abstractmethod
    def fileno(self) -> int: ...

    @abc.abstractmethod
    def poll(self, n: int = 32) -> list[WorkCompletion]: ...

    def req_notify(self) -> None:
        """Re-arm the notification; a no-op where the provider is always armed."""

    def next_timeout(self) -> float | None:
        """Seconds until the provider needs a poll without an fd event (retry timers)."""
        return None

    @abc.abstractmethod
    def close(self) -> None: ...


class QueuePair(abc.ABC):
    """An RC queue pair. One SGE per WR: ``(mr, offset, length)``."""

    qp_num: int
    state: QPState

    @abc.abstractmethod
    def to_init(self) -> None: ...

    @abc.abstractmethod
    def local_info(self, mrs: list[MemoryRegion] | None = None) -> PeerInfo:
        """This QP's half of the side-channel exchange (qpn, psn, gid, rq depth) plus the
        regions in ``mrs`` the peer may target (default: all of the device's)."""

    @abc.abstractmethod
    def connect(self, peer: PeerInfo) -> None:
        """INIT -> RTR -> RTS against ``peer`` (takes ownership of ``peer.fds``)."""

    @abc.abstractmethod
    def post_recv(self, wr_id: int, mr: MemoryRegion, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    def post_send(self, wr_id: int, mr: MemoryRegion, offset: int, length: int,
                  signaled: bool = True) -> None: ...

    def rdma_write(self, wr_id: int, mr: MemoryRegion, offset: int, length: int,
                   remote_addr: int, rkey: int, signaled: bool = True) -> None:
        raise VerbsError(errno.EOPNOTSUPP, "rdma_write not supported by this provider")

    def rdma_read(self, wr_id: int, mr: MemoryRegion, offset: int, length: int,
                  remote_addr: int, rkey: int, signaled: bool = True) -> None:
        raise VerbsError(errno.EOPNOTSUPP, "rdma_read not supported by this provider")

    @abc.abstractmethod
    def to_error(self) -> None:
        """Move to ERR: every outstanding WR completes with WR_FLUSH_ERR."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Device(abc.ABC):
    """An opened device with one protection domain."""

    name: str
    emulated: bool

    @abc.abstractmethod
    def register(self, size: int, access: Access = Access.LOCAL_WRITE,
                 hugepages: bool = True) -> MemoryRegion:
        """Allocate ``size`` bytes (hugepages when available) and register them."""

    @abc.abstractmethod
    def deregister(self, mr: MemoryRegion) -> None: ...

    @abc.abstractmethod
    def create_cq(self, depth: int = 256) -> CompletionQueue: ...

    @abc.abstractmethod
    def create_qp(self, send_cq: CompletionQueue, recv_cq: CompletionQueue,
                  caps: QPCaps = QPCaps(), params: QPParams = QPParams()) -> QueuePair:
        """A new RC QP in RESET."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Provider(abc.ABC):
    """A verbs implementation; ``open_device`` raises :class:`NoDeviceError`."""

    name: str
    emulated: bool

    @abc.abstractmethod
    def open_device(self, name: str | None = None) -> Device: ...
