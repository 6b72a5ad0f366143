"""What softverbs keeps in shared memory, and the records around it.

A QP region starts with a header (``QP_HDR``: magic, version, state word, qpn, owner
pid, min_rnr_timer, RQ capacity) followed by two :class:`RecordRing` s, the RQ (``RQE``
records) and the RCQ (``CQE`` records); see :mod:`.softverbs` for the model and its
memory-ordering argument. Also here: the local and peer memory-region records and the
send work request that :class:`~transport.rdma.softverbs.SoftQP` queues.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any, Protocol

from ..hugepages import Region
from .verbs import Access, MemoryRegion, WCOpcode

__all__ = ["CQE", "IOVA_SHIFT", "LINE", "QP_CLOSED", "QP_HDR", "QP_MAGIC", "QP_VERSION", "RQE",
           "STATE_OFF", "U64", "DeviceServices", "PeerMR", "RecordRing", "SendWR", "SoftMR", "boot_id", "pow2"]

QP_MAGIC = 0x51564253  # "SBVQ"
QP_VERSION = 1
QP_CLOSED = 0xFF  # state word of a destroyed QP (not an ibverbs state)
QP_HDR = struct.Struct("<IIIIIIII")  # magic version state qpn pid min_rnr_timer rq_cap pad
STATE_OFF = 8
U64 = struct.Struct("<Q")
RQE = struct.Struct("<QIIQ")  # wr_id, mr_id, length, offset
CQE = struct.Struct("<QIIII")  # wr_id, status, opcode, byte_len, pad
LINE = 64
IOVA_SHIFT = 40


def boot_id() -> str:
    """Peers must share memory, hence one kernel: the boot id plays the GID's role."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:  # pragma: no cover - every Linux has it
        return "unknown-boot"


class RecordRing:
    """SPSC ring of fixed-size records in a shared mapping; indices grow without wrap.

    Head and tail are read and written through ``memoryview.cast("Q")``: one 8-byte
    load or store. ``struct.pack_into`` zero-fills its target before copying, so a
    peer polling an index written that way can read 0 mid-update (measured here).
    """

    def __init__(self, buf: mmap.mmap, base: int, cap: int, rec: struct.Struct) -> None:
        self._buf, self._cap, self._rec = buf, cap, rec
        self._q = memoryview(buf).cast("Q")
        self._hi, self._ti = base // 8, (base + LINE) // 8
        self._slots = base + 2 * LINE

    @staticmethod
    def nbytes(cap: int, rec: struct.Struct) -> int:
        return 2 * LINE + (cap * rec.size + LINE - 1) // LINE * LINE

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


def pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class DeviceServices(Protocol):
    """What a softverbs CQ or QP asks of its device (:class:`~transport.rdma.softverbs.SoftDevice`)."""

    gid: str
    stats: dict[str, int]

    def new_qpn(self) -> int: ...
    def mrs(self) -> list[MemoryRegion]: ...
    def map_peer(self, fd: int, size: int) -> tuple[memoryview, tuple[int, int]]: ...
    def unmap_peer(self, key: tuple[int, int]) -> None: ...


@dataclass
class SoftMR:
    mr_id: int
    region: Region
    device: DeviceServices


@dataclass
class PeerMR:
    mr_id: int
    iova: int
    length: int
    rkey: int
    access: Access
    view: memoryview
    key: tuple[int, int]


@dataclass
class SendWR:
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
