"""``pyverbs``: the verbs interface on real libibverbs through rdma-core's pyverbs.

Facts it relies on (shared/notes/rdma.md §1-4):

* Debian's pyverbs lives in ``/usr/lib/python3/dist-packages`` for the system 3.11; a
  venv interpreter with the same ABI tag can load it. We load *only* the ``pyverbs``
  package from there (a ``PathFinder`` spec), lazily, without adding that directory to
  ``sys.path`` where it would shadow the venv's packages.
* With no device, ``get_device_list()`` *raises* ``PyverbsRDMAError`` (error_code -1)
  rather than returning ``[]``; the errno (ENOSYS on kernels without RDMA) is only
  visible to a direct ``ibv_get_device_list`` call, which :func:`_probe_errno` makes
  through ctypes so the "no device" message can name it.
* pyverbs 44 hides the masks ``to_rtr``/``to_rts`` use and has no ``CompChannel.fd``
  (added in v57). We build QPAttr + mask ourselves (:func:`init_attr`, :func:`rtr_attr`,
  :func:`rts_attr`, testable without a device) and call ``modify``; the channel fd is
  taken from ``CompChannel.fd`` when present, else found as the one new
  ``anon_inode:[infinibandevent]`` fd that creating the channel opened.
* Completion events: ``get_cq_event``, ``ack_events(1)``, ``req_notify`` (re-arm), *then*
  drain ``poll`` - re-arming before draining avoids a lost wake-up.

* Importing pyverbs calls ``logging.basicConfig(level=INFO)``; :func:`load_pyverbs`
  restores the root logger afterwards.

Nothing in this module has run against a real device on these machines (none exists).
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import random
import select
import sys
from types import SimpleNamespace
from typing import Any

from ..hugepages import alloc_region
from .verbs import (
    Access,
    CompletionQueue,
    Device,
    MemoryRegion,
    NoDeviceError,
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

__all__ = [
    "DIST_PACKAGES",
    "PyverbsCQ",
    "PyverbsDevice",
    "PyverbsProvider",
    "PyverbsQP",
    "device_status",
    "err_attr",
    "import_error",
    "init_attr",
    "list_devices",
    "load_pyverbs",
    "qp_init_attr",
    "recv_wr",
    "rtr_attr",
    "rts_attr",
    "send_wr",
]

DIST_PACKAGES = "/usr/lib/python3/dist-packages"
_pv: SimpleNamespace | None = None


def load_pyverbs() -> SimpleNamespace:
    """Import pyverbs (already importable, or Debian's copy) and return its names.

    Raises ImportError when neither works; the message says where we looked.
    """
    if _pv is not None:
        return _pv
    # pyverbs calls logging.basicConfig(level=INFO) on import; a library must not
    # reconfigure its host's logging, so the root logger is put back as it was.
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        return _load()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _load() -> SimpleNamespace:
    global _pv  # one lazily loaded namespace per process
    if "pyverbs" not in sys.modules:
        try:
            importlib.import_module("pyverbs")
        except ImportError:
            spec = importlib.machinery.PathFinder.find_spec("pyverbs", [DIST_PACKAGES])
            if spec is None or spec.loader is None:
                raise ImportError(f"pyverbs is not installed (looked in sys.path and {DIST_PACKAGES}; "
                                  "Debian: apt-get install python3-pyverbs)") from None
            mod = importlib.util.module_from_spec(spec)
            sys.modules["pyverbs"] = mod
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                del sys.modules["pyverbs"]
                raise
    from pyverbs import enums
    from pyverbs.addr import GID, AHAttr, GlobalRoute
    from pyverbs.cq import CQ, CompChannel
    from pyverbs.device import Context, get_device_list
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsRDMAError
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.wr import SGE, RecvWR, SendWR
    _pv = SimpleNamespace(
        e=enums, GID=GID, AHAttr=AHAttr, GlobalRoute=GlobalRoute, CQ=CQ, CompChannel=CompChannel,
        Context=Context, get_device_list=get_device_list, MR=MR, PD=PD,
        PyverbsRDMAError=PyverbsRDMAError, QP=QP, QPAttr=QPAttr, QPCap=QPCap,
        QPInitAttr=QPInitAttr, SGE=SGE, RecvWR=RecvWR, SendWR=SendWR)
    return _pv


def import_error() -> str | None:
    """None when pyverbs imports, else why not (for skip reasons)."""
    try:
        load_pyverbs()
    except ImportError as exc:
        return f"pyverbs cannot be imported: {exc}"
    return None


def _probe_errno() -> int:
    """The errno ``ibv_get_device_list`` leaves (pyverbs drops it): ENOSYS without RDMA."""
    try:
        lib = ctypes.CDLL("libibverbs.so.1", use_errno=True)
    except OSError:
        return errno.ENOENT
    lib.ibv_get_device_list.restype = ctypes.c_void_p
    lib.ibv_get_device_list.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.ibv_free_device_list.argtypes = [ctypes.c_void_p]
    num = ctypes.c_int(0)
    ctypes.set_errno(0)
    lst = lib.ibv_get_device_list(ctypes.byref(num))
    err = ctypes.get_errno()
    if lst:
        lib.ibv_free_device_list(lst)
        return 0 if num.value else errno.ENODEV
    return err or errno.ENODEV


def list_devices(pv: SimpleNamespace | None = None) -> list[str]:
    """Names of RDMA devices; raises :class:`NoDeviceError` with the errno when none."""
    pv = pv or load_pyverbs()
    try:
        devs = pv.get_device_list()
    except pv.PyverbsRDMAError:
        err = _probe_errno() if pv is _pv else errno.ENOSYS
        name = errno.errorcode.get(err, str(err))
        raise NoDeviceError(err, f"no RDMA device: ibv_get_device_list failed ({name})") from None
    names = [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in devs]
    if not names:
        raise NoDeviceError(errno.ENODEV, "no RDMA device: ibv_get_device_list returned no devices")
    return names


def device_status() -> tuple[bool, str]:
    """(True, names) when a device is listed, else (False, the exact reason)."""
    why = import_error()
    if why is not None:
        return False, why
    try:
        return True, ",".join(list_devices())
    except NoDeviceError as exc:
        return False, exc.strerror or str(exc)


# -- attribute builders (pure: testable without a device) ----------------------------------

def qp_init_attr(pv: SimpleNamespace, scq: Any, rcq: Any, caps: QPCaps) -> Any:
    """RC, one SGE per WR, completions only for signaled WRs."""
    return pv.QPInitAttr(qp_type=pv.e.IBV_QPT_RC, scq=scq, rcq=rcq,
                         cap=pv.QPCap(caps.max_send_wr, caps.max_recv_wr, 1, 1), sq_sig_all=0)


def init_attr(pv: SimpleNamespace, p: QPParams) -> tuple[Any, int]:
    """RESET->INIT: STATE | PKEY_INDEX | PORT | ACCESS_FLAGS."""
    e = pv.e
    a = pv.QPAttr(qp_state=e.IBV_QPS_INIT)
    a.pkey_index = p.pkey_index
    a.port_num = p.port_num
    a.qp_access_flags = int(p.access)
    return a, e.IBV_QP_STATE | e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_ACCESS_FLAGS


def rtr_attr(pv: SimpleNamespace, p: QPParams, own_psn: int, peer: dict[str, Any]) -> tuple[Any, int]:
    """INIT->RTR: STATE | AV | PATH_MTU | DEST_QPN | RQ_PSN | MAX_DEST_RD_ATOMIC |
    MIN_RNR_TIMER. ``rq_psn`` is our own PSN (the peer's ``sq_psn`` is set to it)."""
    e = pv.e
    a = pv.QPAttr(qp_state=e.IBV_QPS_RTR)
    a.path_mtu = min(p.path_mtu, int(peer.get("mtu", p.path_mtu)))
    a.dest_qp_num = int(peer["qpn"])
    a.rq_psn = own_psn
    a.max_dest_rd_atomic = p.max_dest_rd_atomic
    a.min_rnr_timer = p.min_rnr_timer
    gid = str(peer.get("gid") or "")
    is_global = 1 if gid and int(gid.replace(":", ""), 16) != 0 else 0
    if is_global:  # RoCE needs the GRH: is_global with the peer's GID
        gr = pv.GlobalRoute(dgid=pv.GID(gid), sgid_index=p.gid_index)
        a.ah_attr = pv.AHAttr(port_num=p.port_num, dlid=int(peer.get("lid", 0)), is_global=1, gr=gr)
    else:
        a.ah_attr = pv.AHAttr(port_num=p.port_num, dlid=int(peer.get("lid", 0)), is_global=0)
    mask = (e.IBV_QP_STATE | e.IBV_QP_AV | e.IBV_QP_PATH_MTU | e.IBV_QP_DEST_QPN
            | e.IBV_QP_RQ_PSN | e.IBV_QP_MAX_DEST_RD_ATOMIC | e.IBV_QP_MIN_RNR_TIMER)
    return a, mask


def rts_attr(pv: SimpleNamespace, p: QPParams, peer_psn: int) -> tuple[Any, int]:
    """RTR->RTS: STATE | TIMEOUT | RETRY_CNT | RNR_RETRY | SQ_PSN | MAX_QP_RD_ATOMIC.
    ``sq_psn`` is the peer's PSN, the value it set as its ``rq_psn``."""
    e = pv.e
    a = pv.QPAttr(qp_state=e.IBV_QPS_RTS)
    a.timeout = p.timeout
    a.retry_cnt = p.retry_cnt
    a.rnr_retry = p.rnr_retry
    a.sq_psn = peer_psn
    a.max_rd_atomic = p.max_rd_atomic
    mask = (e.IBV_QP_STATE | e.IBV_QP_TIMEOUT | e.IBV_QP_RETRY_CNT | e.IBV_QP_RNR_RETRY
            | e.IBV_QP_SQ_PSN | e.IBV_QP_MAX_QP_RD_ATOMIC)
    return a, mask


def err_attr(pv: SimpleNamespace) -> tuple[Any, int]:
    return pv.QPAttr(qp_state=pv.e.IBV_QPS_ERR), pv.e.IBV_QP_STATE


def recv_wr(pv: SimpleNamespace, wr_id: int, mr: MemoryRegion, offset: int, length: int) -> Any:
    return pv.RecvWR(wr_id, 1, [pv.SGE(mr.addr + offset, length, mr.lkey)])


def send_wr(pv: SimpleNamespace, wr_id: int, mr: MemoryRegion, offset: int, length: int,
            signaled: bool, opcode: int | None = None, remote_addr: int = 0, rkey: int = 0) -> Any:
    e = pv.e
    wr = pv.SendWR(wr_id=wr_id, opcode=e.IBV_WR_SEND if opcode is None else opcode, num_sge=1,
                   sg=[pv.SGE(mr.addr + offset, length, mr.lkey)],
                   send_flags=e.IBV_SEND_SIGNALED if signaled else 0)
    if opcode in (e.IBV_WR_RDMA_WRITE, e.IBV_WR_RDMA_READ):
        wr.set_wr_rdma(rkey, remote_addr)
    return wr


# -- objects that need a device ----------------------------------------------------------------

def _channel_fd(pv: SimpleNamespace, ctx: Any) -> tuple[Any, int]:
    """Create a CompChannel and find its pollable fd (``.fd`` from rdma-core v57)."""
    before = set(os.listdir("/proc/self/fd"))
    ch = pv.CompChannel(ctx)
    fd = getattr(ch, "fd", None)
    if isinstance(fd, int) and fd >= 0:
        return ch, fd
    for name in set(os.listdir("/proc/self/fd")) - before:
        try:
            if "infinibandevent" in os.readlink(f"/proc/self/fd/{name}"):
                return ch, int(name)
        except OSError:
            continue
    ch.close()
    raise VerbsError(errno.ENOTSUP, "cannot find the completion channel's fd")


class PyverbsCQ(CompletionQueue):
    def __init__(self, dev: PyverbsDevice, depth: int) -> None:
        pv = dev.pv
        self._pv = pv
        self._ch, self._fd = _channel_fd(pv, dev.ctx)
        self._cq = pv.CQ(dev.ctx, depth, None, self._ch, 0)
        self._cq.req_notify()
        self._closed = False

    def fileno(self) -> int:
        return self._fd

    def req_notify(self) -> None:
        self._cq.req_notify()

    def poll(self, n: int = 32) -> list[WorkCompletion]:
        if select.select([self._fd], [], [], 0)[0]:
            # Consume and ack the event, re-arm, and only then drain: a completion that
            # lands after the drain raises a new event instead of being missed.
            self._ch.get_cq_event(self._cq)
            self._cq.ack_events(1)
        self._cq.req_notify()
        nc, wcs = self._cq.poll(n)
        out = []
        for wc in wcs[: max(nc, 0)]:
            try:
                status = WCStatus(wc.status)
            except ValueError:
                status = WCStatus.GENERAL_ERR
            # ibv_poll_cq(3): the opcode of an error completion is undefined, so callers
            # must look at the status first; map anything unknown to SEND.
            op = (WCOpcode.RECV if wc.opcode & 0x80 else
                  WCOpcode(wc.opcode) if wc.opcode in (0, 1, 2) else WCOpcode.SEND)
            out.append(WorkCompletion(wc.wr_id, status, op, wc.byte_len, wc.qp_num))
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cq.close()
            self._ch.close()


class PyverbsQP(QueuePair):
    def __init__(self, dev: PyverbsDevice, scq: PyverbsCQ, rcq: PyverbsCQ, caps: QPCaps, params: QPParams) -> None:
        self._dev, self._pv, self.params = dev, dev.pv, params
        self._qp = self._pv.QP(dev.pd, qp_init_attr(self._pv, scq._cq, rcq._cq, caps))
        self.qp_num = self._qp.qp_num
        self.psn = random.getrandbits(24)
        self.state = QPState.RESET
        self.peer_psn = 0

    def _modify(self, new: QPState, attr_mask: tuple[Any, int]) -> None:
        check_transition(self.state, new)
        self._qp.modify(*attr_mask)
        self.state = new

    def to_init(self) -> None:
        self._modify(QPState.INIT, init_attr(self._pv, self.params))

    def local_info(self, mrs: list[MemoryRegion] | None = None) -> PeerInfo:
        d = self._dev
        targets = d.mrs() if mrs is None else mrs
        return PeerInfo({"provider": "pyverbs", "emulation": False, "qpn": self.qp_num, "psn": self.psn,
                         "lid": d.lid, "gid": d.gid, "mtu": min(d.active_mtu, self.params.path_mtu),
                         "mrs": [m.remote_desc() for m in targets]}, [])

    def connect(self, peer: PeerInfo) -> None:
        for fd in peer.fds:  # nothing to map on real hardware
            os.close(fd)
        info = peer.info
        if info.get("provider") != "pyverbs":
            raise VerbsError(errno.EPROTO, f"peer provider {info.get('provider')!r} is not pyverbs")
        if self.state != QPState.INIT:
            raise QPStateError(f"connect needs the QP in INIT, not {self.state.name}")
        self.peer_psn = int(info["psn"])
        self._modify(QPState.RTR, rtr_attr(self._pv, self.params, self.psn, info))
        self._modify(QPState.RTS, rts_attr(self._pv, self.params, self.peer_psn))

    def post_recv(self, wr_id: int, mr: MemoryRegion, offset: int, length: int) -> None:
        if self.state == QPState.RESET:
            raise QPStateError("post_recv in RESET")
        self._qp.post_recv(recv_wr(self._pv, wr_id, mr, offset, length))

    def _send(self, wr: Any) -> None:
        if self.state not in (QPState.RTS, QPState.ERR):  # in ERR the HCA flushes it
            raise QPStateError(f"post_send needs RTS, QP is {self.state.name}")
        self._qp.post_send(wr)

    def post_send(self, wr_id: int, mr: MemoryRegion, offset: int, length: int, signaled: bool = True) -> None:
        self._send(send_wr(self._pv, wr_id, mr, offset, length, signaled))

    def rdma_write(self, wr_id: int, mr: MemoryRegion, offset: int, length: int,
                   remote_addr: int, rkey: int, signaled: bool = True) -> None:
        self._send(send_wr(self._pv, wr_id, mr, offset, length, signaled,
                           self._pv.e.IBV_WR_RDMA_WRITE, remote_addr, rkey))

    def rdma_read(self, wr_id: int, mr: MemoryRegion, offset: int, length: int,
                  remote_addr: int, rkey: int, signaled: bool = True) -> None:
        self._send(send_wr(self._pv, wr_id, mr, offset, length, signaled,
                           self._pv.e.IBV_WR_RDMA_READ, remote_addr, rkey))

    def to_error(self) -> None:
        if self.state != QPState.ERR:
            self._modify(QPState.ERR, err_attr(self._pv))

    def close(self) -> None:
        if self._qp is not None:
            self._qp.close()
            self._qp = None


class PyverbsDevice(Device):
    emulated = False

    def __init__(self, pv: SimpleNamespace, name: str, params: QPParams = QPParams()) -> None:
        self.pv, self.name = pv, name
        self.ctx = pv.Context(name=name)
        try:
            self.pd = pv.PD(self.ctx)
            port = self.ctx.query_port(params.port_num)
            self.lid = int(getattr(port, "lid", 0))
            self.active_mtu = int(getattr(port, "active_mtu", params.path_mtu))
            self.gid = str(self.ctx.query_gid(params.port_num, params.gid_index))
        except BaseException:
            self.ctx.close()
            raise
        self._mrs: dict[int, tuple[MemoryRegion, Any, Any]] = {}

    def mrs(self) -> list[MemoryRegion]:
        return [m for m, _, _ in self._mrs.values()]

    def register(self, size: int, access: Access = Access.LOCAL_WRITE, hugepages: bool = True) -> MemoryRegion:
        region = alloc_region(size, "amsgr-rdma-mr", hugepages=hugepages)
        anchor = ctypes.c_char.from_buffer(region.map)  # pins the mapping while registered
        addr = ctypes.addressof(anchor)
        try:
            mr = self.pv.MR(self.pd, size, int(access), address=addr)
        except BaseException:
            del anchor
            region.close()
            raise
        out = MemoryRegion(addr=addr, length=size, lkey=mr.lkey, rkey=mr.rkey, access=Access(access),
                           buf=memoryview(region.map)[:size], hugetlb=region.hugetlb, handle=mr)
        self._mrs[id(out)] = (out, region, anchor)
        return out

    def deregister(self, mr: MemoryRegion) -> None:
        ent = self._mrs.pop(id(mr), None)
        if ent is None:
            return
        out, region, anchor = ent
        out.handle.close()
        out.buf.release()
        del anchor, ent
        region.close()

    def create_cq(self, depth: int = 256) -> PyverbsCQ:
        return PyverbsCQ(self, depth)

    def create_qp(self, send_cq: CompletionQueue, recv_cq: CompletionQueue,
                  caps: QPCaps = QPCaps(), params: QPParams = QPParams()) -> PyverbsQP:
        if not isinstance(send_cq, PyverbsCQ) or not isinstance(recv_cq, PyverbsCQ):
            raise VerbsError(errno.EINVAL, "pyverbs QPs need pyverbs CQs")
        return PyverbsQP(self, send_cq, recv_cq, caps, params)

    def close(self) -> None:
        for out, _, _ in list(self._mrs.values()):
            self.deregister(out)
        self.pd.close()
        self.ctx.close()


class PyverbsProvider(Provider):
    """Real verbs. ``open_device`` raises :class:`NoDeviceError` (with the errno) when
    discovery fails, as it does on every kernel without RDMA."""

    name = "pyverbs"
    emulated = False

    def __init__(self, pv: SimpleNamespace | None = None) -> None:
        self._pv_override = pv

    @property
    def pv(self) -> SimpleNamespace:
        return self._pv_override or load_pyverbs()

    def open_device(self, name: str | None = None) -> PyverbsDevice:
        names = list_devices(self.pv)
        return PyverbsDevice(self.pv, name or names[0])
