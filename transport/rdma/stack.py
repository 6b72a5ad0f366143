"""The ``rdma`` network stack: byte streams over RC queue pairs (Ceph's ``RDMAStack``).

Per connection (Ceph shares one TX cluster and RX pool per stack; we give each
connection its own registered pools so a stalled connection cannot starve the others
and no cross-connection wake-ups are needed):

* **Side channel.** A Unix SOCK_SEQPACKET socket (softverbs needs SCM_RIGHTS to pass
  its regions; TCP works for pyverbs, which passes no fds). The client sends HELLO
  {verbs info, receive credits, chunk size} after posting its receives; the server
  connects its QP (INIT->RTR->RTS), posts receives and replies HELLO; the client
  connects its QP and sends ACK, which is when the server may send (Ceph's IBSYN
  exchange). The socket then stays open only to detect the peer's death (EOF).
* **Chunks.** TX and RX pools are registered regions cut into ``chunk_size`` chunks
  (hugepages when available via ``alloc_region``). Every receive is posted before the
  peer is told we are ready; a send completion returns its TX chunk.
* **Credits.** A sender may have at most as many DATA messages in flight as the peer
  has announced receive buffers (a cumulative ``credits`` total in every header), so
  the peer never sees receiver-not-ready for data. Credit updates ride on DATA headers;
  a CTRL message carries them when there is nothing to send. The receiver keeps
  ``CTRL_SLOTS`` extra receives for CTRL messages, which it re-posts at once; CTRL
  messages are windowed by an ack count in every header, and an ack-only CTRL is sent
  when half the window is owed (never in reply to an ack alone, so no ping-pong). The
  only way to meet RNR is an ack-only CTRL beyond the window, which rnr_retry=7
  (infinite, Ceph's setting) turns into a short delay, never an error.
* **Readiness.** ``fileno()`` is an epoll fd over the CQ fd, the side channel and a
  notify eventfd; it is readable when data, credits, EOF or an error arrived.
  ``write_fileno()`` is None (transport/stack.py's contract for one-fd stacks): after
  a ``send`` raised BlockingIOError, ``fileno()`` turns readable once send space is back
  and *stays* readable until ``send`` is called again, so an owner that reads first and
  flushes second cannot lose that wake-up. The owner must therefore retry its pending
  output on READABLE (as tests/conformance/suite.py's Endpoint does).
* **Shutdown.** FIN is an in-band flag (after all data, RC keeps order). Side-channel
  EOF without FIN, a dead peer, or an error completion is a reset.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import socket
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

from ..errors import BrokenResourceError, ClosedResourceError
from ..fdpass import recv_fds, send_fds
from ..stack import (
    Address,
    Buffer,
    ConnectedSocket,
    NetworkStack,
    ServerSocket,
    SocketOptions,
)
from .verbs import (
    Access,
    CompletionQueue,
    Device,
    MemoryRegion,
    PeerInfo,
    Provider,
    QPCaps,
    QPParams,
    QueuePair,
    VerbsError,
    WCOpcode,
)

__all__ = ["PROVIDER_ENV", "RdmaConnectedSocket", "RdmaServerSocket", "RdmaStack", "get_provider"]

log = logging.getLogger("transport.rdma")

_HDR = struct.Struct("<BBHIQQ")  # type flags pad payload_len credits ctrl_acks
HDR_SIZE = _HDR.size
_DATA, _CTRL = 1, 2
_FIN = 1
_MAGIC = "amsgr-rdma/1"

# Connection phases.
_CONNECTING, _WAIT_HELLO, _WAIT_ACK, _OPEN, _DEAD = range(5)


#: Overrides the provider of ``RdmaStack()`` when no provider is passed.
PROVIDER_ENV = "ASYNCMSGR_RDMA_PROVIDER"


def get_provider(name: str | None = None) -> Provider:
    """``softverbs``, ``pyverbs``, or ``auto``: pyverbs when a device is listed, otherwise
    softverbs (an EMULATION; logged as such). None: ``$ASYNCMSGR_RDMA_PROVIDER`` or auto."""
    if name is None:
        name = os.environ.get(PROVIDER_ENV, "auto")
    if name == "softverbs":
        from .softverbs import SoftVerbsProvider
        return SoftVerbsProvider()
    if name == "pyverbs":
        from .pyverbs_provider import PyverbsProvider
        return PyverbsProvider()
    if name == "auto":
        from .pyverbs_provider import PyverbsProvider, device_status
        ok, why = device_status()
        if ok:
            return PyverbsProvider()
        log.info("rdma: %s; using softverbs (EMULATION over shared memory)", why)
        from .softverbs import SoftVerbsProvider
        return SoftVerbsProvider()
    raise ValueError(f"unknown verbs provider {name!r} (softverbs, pyverbs, auto)")


def _msg(kind: str, **fields: Any) -> bytes:
    return json.dumps({"m": _MAGIC, "kind": kind, **fields}).encode()


class _Side:
    """The side channel: whole messages with optional fds. SEQPACKET keeps boundaries;
    TCP gets a 4-byte length prefix and carries no fds."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seqpacket = sock.type == socket.SOCK_SEQPACKET
        self._rbuf = bytearray()

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if self.seqpacket:
            send_fds(self.sock, data, fds)
            return
        if fds:
            raise VerbsError(errno.EPROTONOSUPPORT, "a TCP side channel cannot pass fds (softverbs needs a Unix socket)")
        # Control messages are small and sent when the socket is idle: a blocking
        # sendall with a short timeout is bounded and keeps the framing trivial.
        self.sock.settimeout(5.0)
        try:
            self.sock.sendall(struct.pack("!I", len(data)) + data)
        finally:
            self.sock.setblocking(False)

    def recv(self) -> tuple[bytes, list[int]] | None:
        """One message; None when none is complete; (b"", []) at EOF."""
        if self.seqpacket:
            try:
                return recv_fds(self.sock, 65536, 16)
            except BlockingIOError:
                return None
        while True:
            if len(self._rbuf) >= 4:
                (n,) = struct.unpack_from("!I", self._rbuf)
                if n > 1 << 20:
                    raise BrokenResourceError(errno.EPROTO, "side-channel message too large")
                if len(self._rbuf) >= 4 + n:
                    data = bytes(self._rbuf[4: 4 + n])
                    del self._rbuf[: 4 + n]
                    return data, []
            try:
                got = self.sock.recv(65536)
            except BlockingIOError:
                return None
            if not got:
                return b"", []
            self._rbuf += got

    def peer_pid(self) -> int | None:
        if self.sock.family != socket.AF_UNIX:
            return None
        try:
            cred = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        pid = struct.unpack("3i", cred)[0]
        return pid or None

    def close(self) -> None:
        self.sock.close()


def _parse(data: bytes, want: str) -> dict[str, Any]:
    try:
        msg = json.loads(data)
    except ValueError as exc:
        raise BrokenResourceError(errno.EPROTO, f"bad side-channel message: {exc}") from None
    if not isinstance(msg, dict) or msg.get("m") != _MAGIC or msg.get("kind") != want:
        raise BrokenResourceError(errno.EPROTO, f"expected {want} on the rdma side channel")
    return msg


class RdmaConnectedSocket(ConnectedSocket):
    """A byte stream over one RC QP (see the module docstring for the protocol)."""

    def __init__(self, stack: RdmaStack, side: _Side, client: bool) -> None:
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
            self._side.send(_msg(kind, verbs=pi.info, credits=self._r, chunk=self._cs), pi.fds)
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

    def _start_client(self) -> None:
        self._hello("hello")
        self._phase = _WAIT_HELLO

    def _server_handshake(self, data: bytes, fds: list[int]) -> None:
        """Server: the client's HELLO arrived; connect our QP, reply, wait for ACK."""
        try:
            msg = _parse(data, "hello")
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
                    msg = _parse(data, "hello")
                    self._take_hello(msg, fds)
                    self._side.send(_msg("ack"))
                    self._phase = _OPEN
                    self._was_open = True
                    self._credit_wake = True
                    self._notify()
                elif self._phase == _WAIT_HELLO:
                    self._server_handshake(data, fds)
                elif self._phase == _WAIT_ACK:
                    for fd in fds:
                        os.close(fd)
                    _parse(data, "ack")
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
            self._start_client()
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
        self._stack._forget(self)

    @property
    def provider_emulated(self) -> bool:
        return self._stack.device.emulated


class RdmaServerSocket(ServerSocket):
    """A listening side channel. ``accept`` returns a connection once the client's HELLO
    was answered; ``fileno()`` is an epoll over the listener and pending handshakes."""

    MAX_PENDING = 256

    def __init__(self, stack: RdmaStack, sock: socket.socket, addr: Address, unlink: bool) -> None:
        self._stack = stack
        self._sock = sock
        self._addr = addr
        self._unlink = unlink
        self._ino = os.stat(addr).st_ino if unlink and isinstance(addr, str) else None
        self._ep = select.epoll()
        self._ep.register(sock.fileno(), select.EPOLLIN)
        self._rfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._rfd, select.EPOLLIN)
        self._pending: dict[int, _Side] = {}
        self._ready: deque[RdmaConnectedSocket] = deque()
        self._closed = False

    def fileno(self) -> int:
        return self._ep.fileno()

    @property
    def address(self) -> Address:
        return self._addr

    def accept(self) -> RdmaConnectedSocket | None:
        if self._closed:
            raise ClosedResourceError("rdma listener")
        try:
            os.eventfd_read(self._rfd)
        except BlockingIOError:
            pass
        for _ in range(64):  # bounded per call; level triggering brings us back
            try:
                s, _ = self._sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("rdma accept: %s", exc)
                break
            s.setblocking(False)
            if len(self._pending) >= self.MAX_PENDING:
                # Clients that connect and never say HELLO must not pin fds forever.
                old_fd = next(iter(self._pending))
                self._ep.unregister(old_fd)
                self._pending.pop(old_fd).close()
            self._pending[s.fileno()] = _Side(s)
            self._ep.register(s.fileno(), select.EPOLLIN)
        for fd, side in list(self._pending.items()):
            try:
                got = side.recv()
            except OSError:
                got = (b"", [])
            if got is None:
                continue
            del self._pending[fd]
            self._ep.unregister(fd)
            data, fds = got
            if not data:
                side.close()
                continue
            conn: RdmaConnectedSocket | None = None
            try:
                conn = RdmaConnectedSocket(self._stack, side, client=False)
                self._stack._conns.add(conn)
                conn._server_handshake(data, fds)
            except OSError as exc:
                # A client that went away mid-handshake is routine (fault injection,
                # a connect timeout); anything else is worth a warning.
                gone = exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED)
                (log.debug if gone else log.warning)("rdma handshake failed: %s", exc)
                if conn is not None:
                    conn.close()
                else:
                    side.close()
                continue
            self._ready.append(conn)
        if not self._ready:
            return None
        conn = self._ready.popleft()
        if self._ready:
            os.eventfd_write(self._rfd, 1)
        return conn

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for side in self._pending.values():
            side.close()
        self._pending.clear()
        for conn in self._ready:
            conn.close()
        self._ready.clear()
        if self._ino is not None and isinstance(self._addr, str):
            try:
                if os.stat(self._addr).st_ino == self._ino:
                    os.unlink(self._addr)
            except OSError:
                pass
        self._sock.close()
        self._ep.close()
        os.close(self._rfd)


class RdmaStack(NetworkStack):
    """Sockets over verbs RC queue pairs.

    ``provider``: "softverbs" (EMULATION), "pyverbs", "auto" (pyverbs only when a device
    is listed) or None (``$ASYNCMSGR_RDMA_PROVIDER``, default auto). The device is opened
    on first use, i.e. after a worker forked (verbs resources do not survive fork).
    Addresses are side-channel addresses: a Unix path (or "\\0abstract") or, for the
    pyverbs provider only, ("host", port) over TCP. Both ends must use one provider.
    """

    name = "rdma"
    CTRL_SLOTS = 4

    def __init__(self, provider: str | Provider | None = None, *, chunk_size: int = 64 * 1024,
                 rx_chunks: int = 16, tx_chunks: int = 16, hugepages: bool = True,
                 qp_params: QPParams = QPParams(), device_name: str | None = None) -> None:
        if chunk_size <= HDR_SIZE or rx_chunks < 2 or tx_chunks < 1:
            raise ValueError("chunk_size must exceed the header; rx_chunks >= 2, tx_chunks >= 1")
        self.provider = provider if isinstance(provider, Provider) else get_provider(provider)
        self.chunk_size = chunk_size
        self.rx_chunks = rx_chunks
        self.tx_chunks = tx_chunks
        self.hugepages = hugepages
        self.qp_params = qp_params
        self._device_name = device_name
        self._device: Device | None = None
        self._device_pid = 0
        self._conns: set[RdmaConnectedSocket] = set()

    @property
    def emulated(self) -> bool:
        return self.provider.emulated

    @property
    def device(self) -> Device:
        if self._device is not None and self._device_pid != os.getpid():
            # Opened before a fork: verbs resources do not survive fork (ibv_fork_init
            # aside), so a forked worker opens its own and leaves the parent's alone.
            self._device = None
            self._conns = set()
        if self._device is None:
            self._device = self.provider.open_device(self._device_name)
            self._device_pid = os.getpid()
        return self._device

    def _forget(self, conn: RdmaConnectedSocket) -> None:
        self._conns.discard(conn)

    @staticmethod
    def _family(addr: Address) -> int:
        return socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET6 if ":" in addr[0] else socket.AF_INET

    def _check_family(self, fam: int) -> None:
        if fam != socket.AF_UNIX and self.provider.name == "softverbs":
            raise VerbsError(errno.EPROTONOSUPPORT,
                             "softverbs passes memory by SCM_RIGHTS: its side channel must be a Unix socket path")

    def listen(self, addr: Address, opts: SocketOptions = SocketOptions()) -> RdmaServerSocket:
        fam = self._family(addr)
        self._check_family(fam)
        kind = socket.SOCK_SEQPACKET if fam == socket.AF_UNIX else socket.SOCK_STREAM
        sock = socket.socket(fam, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            if fam != socket.AF_UNIX and opts.reuseaddr:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(opts.backlog)
            bound: Address = addr if fam == socket.AF_UNIX else sock.getsockname()[:2]
        except BaseException:
            sock.close()
            raise
        unlink = fam == socket.AF_UNIX and isinstance(addr, str) and not addr.startswith("\0")
        return RdmaServerSocket(self, sock, bound, unlink)

    def connect(self, addr: Address, opts: SocketOptions = SocketOptions()) -> RdmaConnectedSocket:
        fam = self._family(addr)
        self._check_family(fam)
        kind = socket.SOCK_SEQPACKET if fam == socket.AF_UNIX else socket.SOCK_STREAM
        sock = socket.socket(fam, kind | socket.SOCK_CLOEXEC)
        try:
            if fam == socket.AF_UNIX:
                # A Unix connect completes at once unless the backlog is full; bound it.
                sock.settimeout(5.0)
                sock.connect(addr)
                sock.setblocking(False)
            else:
                if opts.nodelay:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                try:
                    sock.connect(addr)
                except BlockingIOError:
                    pass
        except BaseException:
            sock.close()
            raise
        conn = RdmaConnectedSocket(self, _Side(sock), client=True)
        self._conns.add(conn)
        if fam == socket.AF_UNIX:
            try:
                conn._start_client()
            except BaseException:
                conn.close()
                raise
        else:
            # Until the TCP connect completes, writability is what wakes ``fileno()``.
            conn._ep.modify(sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        return conn

    def adopt(self, sock: socket.socket) -> RdmaConnectedSocket:
        """The server end of a side channel accepted elsewhere.

        Unix sockets have no SO_REUSEPORT, so a pool accepts in one process (the
        Processor) and hands each accepted fd to a worker by SCM_RIGHTS; the worker
        adopts it here. The QP and its regions are then created in the worker, whose
        loop runs the handshake: ``fileno()`` turns readable when the HELLO arrives and
        ``read_into``/``send`` raise BlockingIOError until the connection is up.
        """
        self._check_family(sock.family)
        sock.setblocking(False)
        conn = RdmaConnectedSocket(self, _Side(sock), client=False)
        self._conns.add(conn)
        return conn

    def close(self) -> None:
        """Close every socket still open and the device (this process's only)."""
        if self._device is not None and self._device_pid != os.getpid():
            self._device, self._conns = None, set()
        for conn in list(self._conns):
            conn.close()
        if self._device is not None:
            self._device.close()
            self._device = None
