"""One rdma connection: a byte stream over an RC queue pair (the protocol is in :mod:`.stack`).

:class:`RdmaConnectedSocket` owns its QP, CQ, registered TX/RX chunk pools, the side
channel (:mod:`.sidechannel`) and an epoll fd over them; the stack builds it and runs
the first handshake step (:meth:`RdmaConnectedSocket.start_client` or
:meth:`RdmaConnectedSocket.server_handshake`).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

from ..errors import BrokenResourceError, ClosedResourceError
from ..stack import (
    Buffer,
    ConnectedSocket,
)
from .sidechannel import SideChannel, parse_side_message, side_message
from .verbs import (
    Access,
    CompletionQueue,
    Device,
    MemoryRegion,
    PeerInfo,
    QPCaps,
    QPParams,
    QueuePair,
    WCOpcode,
)

__all__ = ["HDR_SIZE", "RdmaConnectedSocket", "StackParams"]

log = logging.getLogger("transport.rdma")

_HDR = struct.Struct("<BBHIQQ")  # type flags pad payload_len credits ctrl_acks
HDR_SIZE = _HDR.size
_DATA, _CTRL = 1, 2
_FIN = 1

# Connection phases.
_CONNECTING, _WAIT_HELLO, _WAIT_ACK, _OPEN, _DEAD = range(5)


class StackParams(Protocol):
    """What a connection reads from its :class:`~transport.rdma.stack.RdmaStack`."""

    CTRL_SLOTS: int
    chunk_size: int
    rx_chunks: int
    tx_chunks: int
    hugepages: bool
    qp_params: QPParams

    @property
    def device(self) -> Device: ...
    def forget(self, conn: RdmaConnectedSocket) -> None: ...


class RdmaConnectedSocket(ConnectedSocket):
    """A byte stream over one RC QP (see the module docstring for the protocol)."""

    def __init__(self, stack: StackParams, side: SideChannel, client: bool) -> None:
        self._stack = stack
        self._side = side
        self._client = client
        self._phase = _CONNECTING if client else _WAIT_HELLO
        self._err: OSError | None = None  # a reset, raised once buffered data is read
        self._closed = False
        self._shut = False
        self._peer_fin = False
        self._fin_sent = False
        self._fin_pending = False
        self._side_open = True
        self._send_blocked = False
        self._credit_wake = False  # send space appeared after a blocked send: stay readable
        self._notified = False  # the notify eventfd holds a count
        self._was_open = False
        self._rxq: deque[list[int]] = deque()  # [chunk, start, end] of unread data
        dev = stack.device
        r, c, t = stack.rx_chunks, stack.CTRL_SLOTS, stack.tx_chunks
        self._r, self._c, self._t = r, c, t
        self._cs = stack.chunk_size
        self._ep = select.epoll()
        self._nfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._cq: CompletionQueue | None = None
        self._qp: QueuePair | None = None
        self._rx: MemoryRegion | None = None
        self._tx: MemoryRegion | None = None
        try:
            self._ep.register(self._nfd, select.EPOLLIN)
            self._ep.register(side.sock.fileno(), select.EPOLLIN)
            self._cq = dev.create_cq(2 * (r + c + t + c + 2))
            self._ep.register(self._cq.fileno(), select.EPOLLIN)
            self._qp = dev.create_qp(self._cq, self._cq, QPCaps(t + 2 * c + 2, r + c), stack.qp_params)
            self._qp.to_init()
            self._rx = dev.register((r + c) * self._cs, Access.LOCAL_WRITE, stack.hugepages)
            self._tx = dev.register((t + 2 * c + 2) * self._cs, Access.NONE, stack.hugepages)
            self._cq.req_notify()
            for i in range(r + c):  # every receive is posted before the peer hears of us
                self._qp.post_recv(i, self._rx, i * self._cs, self._cs)
        except BaseException:
            self._release()
            raise
        # TX chunks [0, t) carry DATA, [t, t + 2c + 2) CTRL, so CTRL never waits on data.
        self._tx_free: deque[int] = deque(range(t))
        self._ctrl_free: deque[int] = deque(range(t, t + 2 * c + 2))
        # Credit and ack accounting (cumulative counters).
        self._freed = r  # data receive buffers made available to the peer, ever
        self._announced = r
        self._peer_total = 0
        self._data_sent = self._data_recvd = 0
        self._ctrl_sent = self._peer_acks = 0
        self._ctrl_recvd = self._acks_sent = 0
        self._peer_payload = self._cs - HDR_SIZE

    # -- setup -------------------------------------------------------------------------
    def _hello(self, kind: str) -> None:
        assert self._qp is not None and self._rx is not None
        pi = self._qp.local_info(mrs=[self._rx])
        try:
            self._side.send(side_message(kind, verbs=pi.info, credits=self._r, chunk=self._cs), pi.fds)
        finally:
            for fd in pi.fds:
                os.close(fd)

    def _take_hello(self, msg: dict[str, Any], fds: list[int]) -> None:
        """Connect our QP to the peer's HELLO; anything malformed is EPROTO (the fds
        that came with it are closed either way)."""
        assert self._qp is not None
        try:
            info = dict(msg["verbs"])
            credits, chunk = int(msg["credits"]), int(msg["chunk"])
            if credits < 1 or chunk <= HDR_SIZE:
                raise ValueError("credits/chunk out of range")
        except (KeyError, TypeError, ValueError) as exc:
            for fd in fds:
                os.close(fd)
            raise BrokenResourceError(errno.EPROTO, f"malformed rdma HELLO: {exc!r}") from None
        pid = self._side.peer_pid()
        if pid is not None and info.get("provider") == "softverbs":
            info["pid"] = pid  # the kernel's word (SO_PEERCRED), valid across pid namespaces
        try:
            self._qp.connect(PeerInfo(info, fds))  # owns the fds from here on
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BrokenResourceError(errno.EPROTO, f"malformed rdma HELLO: {exc!r}") from None
        self._peer_total = credits
        self._peer_payload = min(self._cs, chunk) - HDR_SIZE

    def start_client(self) -> None:
        """Client over a connected side channel: send our HELLO (the stack calls this)."""
        self._hello("hello")
        self._phase = _WAIT_HELLO

    def server_handshake(self, data: bytes, fds: list[int]) -> None:
        """Server: the client's HELLO arrived; connect our QP, reply, wait for ACK."""
        try:
            msg = parse_side_message(data, "hello")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._take_hello(msg, fds)
        self._hello("hello")
        self._phase = _WAIT_ACK

    def _side_event(self) -> None:
        """Read the side channel: handshake steps, or EOF (the peer closed or died)."""
        while self._side_open:
            try:
                got = self._side.recv()
            except OSError as exc:
                got = (b"", [])
                if not isinstance(exc, ConnectionResetError):
                    log.debug("rdma side channel: %s", exc)
            if got is None:
                return
            data, fds = got
            if not data:
                self._side_eof()
                return
            try:
                if self._phase == _WAIT_HELLO and self._client:
                    msg = parse_side_message(data, "hello")
                    self._take_hello(msg, fds)
                    self._side.send(side_message("ack"))
                    self._phase = _OPEN
                    self._was_open = True
                    self._credit_wake = True
                    self._notify()
                elif self._phase == _WAIT_HELLO:
                    self.server_handshake(data, fds)
                elif self._phase == _WAIT_ACK:
                    for fd in fds:
                        os.close(fd)
                    parse_side_message(data, "ack")
                    self._phase = _OPEN
                    self._was_open = True
                    self._credit_wake = True
                    self._notify()
                else:
                    for fd in fds:
                        os.close(fd)
                    raise BrokenResourceError(errno.EPROTO, "unexpected rdma side-channel message")
            except OSError as exc:
                self._fail(exc if isinstance(exc, ConnectionError) else ConnectionResetError(
                    exc.errno or errno.ECONNRESET, f"rdma connection setup failed: {exc}"))
                return

    def _side_eof(self) -> None:
        self._side_open = False
        try:
            self._ep.unregister(self._side.sock.fileno())
        except (OSError, ValueError):
            pass
        self._poll_cq()  # whatever the peer sent before it went away comes first
        if self._peer_fin:
            # Orderly close: reads end with EOF, writes fail as on a closed TCP peer.
            self._fail(BrokenPipeError(errno.EPIPE, "rdma peer closed"))
        else:
            self._fail(ConnectionResetError(errno.ECONNRESET, "rdma peer closed or died without FIN"))

    # -- completions -------------------------------------------------------------------
    def _poll_cq(self) -> int:
        """Drain the CQ; returns how many completions it handled."""
        cq, qp = self._cq, self._qp
        if cq is None or qp is None or self._phase == _DEAD:
            return 0
        cq.req_notify()  # re-arm before draining: no completion is missed
        total = 0
        while True:
            wcs = cq.poll(64)
            total += len(wcs)
            for wc in wcs:
                if wc.opcode == WCOpcode.RECV:
                    self._on_recv(wc.wr_id, wc.byte_len, wc.ok, wc.status)
                elif wc.ok:
                    (self._tx_free if wc.wr_id < self._t else self._ctrl_free).append(wc.wr_id)
                else:
                    self._fail(ConnectionResetError(errno.ECONNRESET, f"rdma send failed: {wc.status.name}"))
            if len(wcs) < 64:
                return total

    def _on_recv(self, idx: int, nbytes: int, ok: bool, status: Any) -> None:
        if not ok:
            self._fail(ConnectionResetError(errno.ECONNRESET, f"rdma receive failed: {status.name}"))
            return
        assert self._rx is not None
        base = idx * self._cs
        if nbytes < HDR_SIZE:
            self._fail(ConnectionResetError(errno.EPROTO, "rdma message shorter than its header"))
            return
        kind, flags, _, plen, credits, acks = _HDR.unpack_from(self._rx.buf, base)
        if HDR_SIZE + plen != nbytes or kind not in (_DATA, _CTRL):
            self._fail(ConnectionResetError(errno.EPROTO, "malformed rdma message"))
            return
        if credits > self._peer_total:
            self._peer_total = credits
            self._notify_if_blocked()
        self._peer_acks = max(self._peer_acks, acks)
        if kind == _DATA:
            self._data_recvd += 1
            self._rxq.append([idx, base + HDR_SIZE, base + HDR_SIZE + plen])
        else:
            self._ctrl_recvd += 1
            self._repost(idx, data=False)
            if flags & _FIN:
                self._peer_fin = True

    def _repost(self, idx: int, data: bool) -> None:
        assert self._qp is not None and self._rx is not None
        if self._phase == _DEAD:
            return
        try:
            self._qp.post_recv(idx, self._rx, idx * self._cs, self._cs)
        except OSError as exc:
            self._fail(ConnectionResetError(exc.errno or errno.ECONNRESET, f"rdma post_recv: {exc}"))
            return
        if data:
            self._freed += 1

    # -- control messages ----------------------------------------------------------------
    def _post(self, chunk: int, kind: int, flags: int, payload: int) -> None:
        assert self._qp is not None and self._tx is not None
        _HDR.pack_into(self._tx.buf, chunk * self._cs, kind, flags, 0, payload,
                       self._freed, self._ctrl_recvd)
        self._qp.post_send(chunk, self._tx, chunk * self._cs, HDR_SIZE + payload)
        self._announced = self._freed
        self._acks_sent = self._ctrl_recvd

    def _maybe_ctrl(self) -> None:
        if self._phase != _OPEN or self._err is not None:
            return
        unannounced = self._freed - self._announced
        owed = self._ctrl_recvd - self._acks_sent
        peer_avail = self._announced - self._data_recvd
        window_open = self._ctrl_sent - self._peer_acks < self._c
        want = ((self._fin_pending and window_open)
                or (unannounced > 0 and window_open
                    and (unannounced >= max(1, self._r // 2) or peer_avail <= self._r // 4))
                or owed >= max(1, self._c // 2))
        if not want or not self._ctrl_free:
            return
        flags = 0
        if self._fin_pending and window_open:
            flags = _FIN
        chunk = self._ctrl_free.popleft()
        try:
            self._post(chunk, _CTRL, flags, 0)
        except OSError as exc:
            self._fail(BrokenPipeError(exc.errno or errno.EPIPE, f"rdma post_send: {exc}"))
            return
        self._ctrl_sent += 1
        if flags:
            self._fin_pending = False
            self._fin_sent = True

    def _progress(self) -> None:
        """Everything a wake-up may mean: side channel, completions, credits to return."""
        if self._closed:
            return
        if self._notified:
            self._notified = False
            try:
                os.eventfd_read(self._nfd)
            except BlockingIOError:
                pass
        if self._side_open and self._phase != _OPEN:
            self._side_event()
        got = 0
        if self._phase in (_OPEN, _WAIT_ACK):
            got = self._poll_cq()
            self._maybe_ctrl()
        if self._side_open and self._phase == _OPEN and not got:
            # Open, the side channel only speaks to say the peer is gone. Look at it
            # when a wake-up brought no completion (saves a syscall per busy call; a
            # pending EOF keeps fileno() readable until we do).
            for fd, _ in self._ep.poll(0):
                if fd == self._side.sock.fileno():
                    self._side_event()
                    break

    def _notify(self) -> None:
        if not self._notified:
            self._notified = True
            os.eventfd_write(self._nfd, 1)

    def _notify_if_blocked(self) -> None:
        if self._send_blocked:
            self._credit_wake = True
            self._notify()

    def _rearm(self) -> None:
        """Leaving read_into/send: progress may have drained the wake-up fds while
        leaving work for the app (data, EOF, an error, send space): make ``fileno()``
        readable again, level-triggered style, until the app has taken it."""
        pending = self._rxq or self._peer_fin or self._err is not None or self._credit_wake
        if pending and not self._closed:
            self._notify()

    def _fail(self, exc: OSError) -> None:
        if self._err is None:
            self._err = exc
        if self._phase != _DEAD:
            self._phase = _DEAD
            if self._qp is not None:
                try:
                    self._qp.to_error()
                except OSError:
                    pass
        if self._side_open:
            self._side_open = False
            try:
                self._ep.unregister(self._side.sock.fileno())
            except (OSError, ValueError):
                pass
        self._notify()

    # -- ConnectedSocket ---------------------------------------------------------------
    def fileno(self) -> int:
        return self._ep.fileno()

    def write_fileno(self) -> int | None:
        return None

    def is_connected(self) -> int:
        if self._closed:
            raise ClosedResourceError("rdma socket")
        if self._phase == _CONNECTING:
            if self._side.sock.family != socket.AF_UNIX:
                err = self._side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                try:
                    self._side.sock.getpeername()
                except OSError:
                    return 0
                self._ep.modify(self._side.sock.fileno(), select.EPOLLIN)
            self.start_client()
        if self._phase == _DEAD and not self._was_open and self._err is not None:
            raise self._err
        return 1

    def read_into(self, buf: memoryview) -> int:
        if self._closed:
            raise ClosedResourceError("rdma socket")
        try:
            return self._read_into(buf)
        finally:
            self._rearm()

    def _read_into(self, buf: memoryview) -> int:
        self._progress()
        if self._shut:
            return 0
        n = 0
        want = len(buf)
        rx = self._rx
        while self._rxq and n < want and rx is not None:
            ent = self._rxq[0]
            take = min(want - n, ent[2] - ent[1])
            buf[n: n + take] = rx.buf[ent[1]: ent[1] + take]
            n += take
            ent[1] += take
            if ent[1] == ent[2]:
                self._rxq.popleft()
                self._repost(ent[0], data=True)
        if n:
            self._maybe_ctrl()
            return n
        if self._peer_fin:
            return 0
        if self._err is not None:
            raise self._err
        if want == 0:
            return 0
        raise BlockingIOError(errno.EAGAIN, "no data")

    def send(self, buffers: Sequence[Buffer]) -> int:
        if self._closed:
            raise ClosedResourceError("rdma socket")
        if self._shut or self._fin_pending or self._fin_sent:
            raise BrokenPipeError(errno.EPIPE, "rdma socket was shut down")
        self._credit_wake = False  # the app is sending now
        self._send_blocked = False
        try:
            return self._send(buffers)
        finally:
            self._rearm()

    def _send(self, buffers: Sequence[Buffer]) -> int:
        self._progress()
        if self._err is not None:
            raise BrokenPipeError(self._err.errno or errno.EPIPE, f"rdma peer gone: {self._err.strerror}")
        if self._phase != _OPEN:
            self._send_blocked = True
            raise BlockingIOError(errno.EAGAIN, "rdma connection not established yet")
        assert self._tx is not None and self._qp is not None
        txbuf = self._tx.buf
        total = 0
        bi, boff = 0, 0
        views = []
        for b in buffers:
            v = memoryview(b)
            views.append(v if v.format == "B" and v.ndim == 1 else v.cast("B"))
        nbuf = len(views)
        while bi < nbuf:
            if self._peer_total - self._data_sent <= 0 or not self._tx_free:
                break
            chunk = self._tx_free[0]
            base = chunk * self._cs + HDR_SIZE
            fill = 0
            cap = self._peer_payload
            while bi < nbuf and fill < cap:
                v = views[bi]
                take = min(cap - fill, len(v) - boff)
                if take:
                    txbuf[base + fill: base + fill + take] = v[boff: boff + take]
                fill += take
                boff += take
                if boff >= len(v):
                    bi, boff = bi + 1, 0
            if not fill:
                continue
            self._tx_free.popleft()
            try:
                self._post(chunk, _DATA, 0, fill)
            except OSError as exc:
                self._tx_free.appendleft(chunk)
                self._fail(BrokenPipeError(exc.errno or errno.EPIPE, f"rdma post_send: {exc}"))
                break
            self._data_sent += 1
            total += fill
        if total:
            # Synchronous providers complete sends at once: reclaim chunks now.
            self._poll_cq()
            return total
        if self._err is not None:
            raise BrokenPipeError(self._err.errno or errno.EPIPE, f"rdma peer gone: {self._err.strerror}")
        if sum(len(v) for v in views) == 0:
            return 0
        self._send_blocked = True
        raise BlockingIOError(errno.EAGAIN, "no rdma credits or send chunks")

    def shutdown(self) -> None:
        if self._closed or self._shut:
            return
        self._shut = True
        if self._phase == _OPEN and self._err is None and not self._fin_sent:
            self._fin_pending = True
            self._progress()
        self._notify()

    def close(self) -> None:
        if self._closed:
            return
        if self._phase == _OPEN and self._err is None and not self._fin_sent:
            # Best effort orderly FIN so the peer reads EOF rather than a reset.
            self._fin_pending = True
            try:
                self._poll_cq()
                self._maybe_ctrl()
            except OSError:
                pass
        self._closed = True
        self._release()

    def _release(self) -> None:
        if self._qp is not None:
            self._qp.close()
            self._qp = None
        if self._cq is not None:
            self._cq.close()
            self._cq = None
        dev = self._stack.device
        for mr in (self._rx, self._tx):
            if mr is not None:
                dev.deregister(mr)
        self._rx = self._tx = None
        self._rxq.clear()
        self._side.close()
        self._ep.close()
        if self._nfd >= 0:
            os.close(self._nfd)
            self._nfd = -1
        self._stack.forget(self)

    def wait_connect(self) -> None:
        """Until a TCP side channel's connect completes, writability is what wakes
        ``fileno()`` (the stack calls this after a non-blocking connect)."""
        self._ep.modify(self._side.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    @property
    def provider_emulated(self) -> bool:
        return self._stack.device.emulated


