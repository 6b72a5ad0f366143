"""A reliable, ordered byte stream over one memif interface (memif itself is lossy).

memif has no end-to-end flow control: a full ring makes DPDK's tx drop frames
(shared/notes/memif.md §3.8, §5 trap 3). Each frame here carries a 12-byte header::

    type u8 | flags u8 | wnd u16 | seq u32 | ack u32      (little-endian, "<BBHII")

* ``seq`` numbers *segments* (DATA and FIN each take one); ``ack`` is the next segment
  the sender of the frame expects (cumulative); ``wnd`` is how many segments past
  ``ack`` it can take (its free receive buffer in segments).
* The sender keeps at most ``min(wnd, window)`` segments unacknowledged, ``window`` ≤
  half the ring so DATA plus ACK frames never overflow a ring (trap 3), and keeps every
  unacked segment for retransmission. Loss recovery is TCP NewReno's shape: the
  receiver holds segments past a hole and re-acks; 3 duplicate acks, a partial ack
  during recovery, or the retransmission timeout (20 ms, doubling up to 1 s, reset on
  progress) resend the oldest unacked segment. Duplicates are dropped and re-acked.
* ACKs ride on data when there is any. A pure ACK (each one is a kick that wakes the
  peer) goes out at once after a hole, a duplicate or FIN, for a window update (the
  reader freed much of a small window) or after a quarter window of segments, else
  after a 0.5 ms delay (TCP's delayed ACK): a request/reply pair then costs two frames.
* ``shutdown`` queues FIN; ``close`` sends FIN (when everything else is in the ring)
  then DISCONNECT. A peer that sees DISCONNECT first drains its ring (the memory stays
  mapped on both sides) and reports EOF if FIN was there, ``ConnectionResetError`` if not.

Readiness (transport.stack contract, ``write_fileno() is None``): :meth:`fileno` is an
epoll fd over the rx eventfd (data *and* acks/credits arrive as frames), the control
socket, a timerfd (retransmit, retry when the ring was full) and a private wake eventfd.
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ClosedResourceError
from ..event_center import EventCenter
from ..stack import Address, Buffer, ConnectedSocket
from ..timerfd import TimerFd
from .client import MemifConnector
from .interface import MemifDisconnected, MemifInterface
from .segments import ACK, DATA, FIN, HDR, RST, SEQ_MASK, ReliableSegments

__all__ = ["ACK", "DATA", "FIN", "HDR", "RST", "MemifStream"]

_RING_RETRY = 0.0005  # tx ring full: the peer frees slots without telling us; look again soon


class MemifStream(ReliableSegments, ConnectedSocket):
    """One memif connection as a byte stream (a :class:`ConnectedSocket`).

    Built either from a finished :class:`MemifInterface` (server side, after accept) or
    from a pipelined :class:`MemifConnector` still handshaking (client side; it reports
    connected at once and finishes the handshake as the listener answers).
    Server-side connections move between processes with :meth:`export` / :meth:`adopt`.
    """

    def __init__(self, iface: MemifInterface | MemifConnector, window: int | None = None,
                 rcvbuf: int = 4 << 20, address: Address | None = None,
                 mss: int = 2048 - 12, drop_every: int = 0) -> None:
        self._ep = select.epoll(sizehint=4, flags=select.EPOLL_CLOEXEC)
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._timer = TimerFd()
        self._ep.register(self._wake, select.EPOLLIN)
        self._ep.register(self._timer.fd, select.EPOLLIN)
        self._address = address
        self._want_mss = mss
        self._want_window = window
        self._rcvbuf = rcvbuf
        self._drop_every = drop_every  # test hook: drop every Nth received DATA frame
        self.iface: MemifInterface | None = None
        self._conn: MemifConnector | None = None
        self._error: OSError | None = None
        self._closed = False
        self._wake_set = False  # our wake eventfd holds a count (saves syscalls)
        self.on_close: list[Callable[[], None]] = []  # run by close() (removes the poller)
        # Poll mode (bind_poller): readiness and deadlines are handled in user space.
        self._fire: Callable[[], bool] | None = None
        self._fire_pending = False  # data/EOF/error waits for the owner's read callback
        self._ring_hint = False  # the poller saw frames: read_into may skip epoll_wait
        self._due = 0.0  # poll mode's stand-in for the timerfd (CLOCK_MONOTONIC deadline)
        self._init_segments()
        self._peer_gone = False
        if isinstance(iface, MemifInterface):
            self._up(iface)
        else:
            self._conn = iface
            self._ep.register(iface.fileno(), select.EPOLLIN)

    # -- setup ---------------------------------------------------------------------------
    def _up(self, iface: MemifInterface) -> None:
        self.iface = iface
        self._conn = None
        ring = iface.ring_size(0)
        # Window ≤ half the ring: DATA and ACK frames together never overflow it (trap 3).
        w = max(1, ring // 2 - 16) if ring >= 64 else max(1, ring // 2)
        self._window = min(self._want_window or w, w)
        self._ack_every = max(1, self._window // 4)
        # One segment per buffer normally; a bigger MSS still works (chained descriptors).
        self._mss = self._want_mss
        self._rcvbuf = max(self._rcvbuf, self._window * self._mss)
        self._peer_wnd = self._window  # both sides start with the full window
        self._adv_wnd = self._window
        self._ep.register(iface.fileno(0), select.EPOLLIN)
        self._ep.register(iface.ctrl_fileno(), select.EPOLLIN)

    def bind_poller(self, center: EventCenter) -> None:
        """Poll mode: register :meth:`poll` on ``center`` (removed on close) and report
        readiness in user space. The peer does not kick (we set MASK_INT on our rx ring);
        found frames, pending data and due deadlines run the read callback registered
        for :meth:`fileno` directly (``EventCenter.fire_file_event``), so a busy-polled
        connection makes no eventfd, epoll or timerfd syscall per message. The kernel
        path stays for what is not memory: the control socket, and reads paused by the
        owner (then the wake eventfd keeps :meth:`fileno` readable, as in interrupt mode)."""
        fd = self._ep.fileno()
        self._fire = lambda: center.fire_file_event(fd)
        pid = center.add_poller(self.poll)
        self.on_close.append(lambda: center.remove_poller(pid))

    def poll(self) -> bool:
        """Busy-poll hook (EventCenter poller): True when it found work for the owner."""
        if self._wake_set:
            return False  # the kernel path already reports readable
        iface = self.iface
        if not (iface is not None and iface.rx_rings[0].rx_ready()) and \
                not self._fire_pending and not (self._due and time.monotonic() >= self._due):
            return False
        self._ring_hint = True
        fire = self._fire
        if fire is None:
            self._signal_kernel()
            return True
        self._fire_pending = False
        if not fire():
            self._signal_kernel()  # the owner paused reading: keep the level until it resumes
        return True

    def export(self) -> tuple[dict[str, Any], list[int]]:
        """Hand this server-side connection, with its stream state, to another process.

        Returns (metadata of plain values and bytes, fds to pass by SCM_RIGHTS and then
        close). Unacknowledged segments travel along and are sent again by the adopter
        (duplicates are dropped by the peer); received but unread bytes travel too.
        This object is closed without FIN or DISCONNECT.
        """
        if self.iface is None or self._closed:
            raise ClosedResourceError("memif socket (not up)")
        self._service(signal=False)  # take in what is in the ring; acks go out now
        if self._error is not None:
            raise self._error
        state = {
            "snd_una": self._snd_una, "snd_nxt": self._snd_nxt,
            "unacked": [[seq, kind, payload] for seq, kind, payload in self._unacked],
            "peer_wnd": self._peer_wnd, "window": self._window, "mss": self._mss,
            "rcvbuf": self._rcvbuf, "rcv_nxt": self._rcv_nxt,
            "rx": b"".join(self._rxq)[self._rx_off:] if self._rxq else b"",
            "ooo": [[seq, kind, payload] for seq, (kind, payload) in self._ooo.items()],
            "fin_rcvd": self._fin_rcvd, "fin_queued": self._fin_queued,
            "rd_shut": self._rd_shut, "wr_shut": self._wr_shut,
        }
        meta, fds = self.iface.export()
        self.iface = None
        self.close()
        return {"iface": meta, "stream": state}, fds

    @classmethod
    def adopt(cls, meta: dict[str, Any], fds: list[int]) -> MemifStream:
        """Rebuild an exported connection here; takes ownership of ``fds``."""
        iface = MemifInterface.adopt(meta["iface"], fds)
        st = meta["stream"]
        self = cls(iface, window=st["window"], rcvbuf=st["rcvbuf"], mss=st["mss"])
        self._snd_una = self._resend_from = st["snd_una"]  # resend everything unacked
        self._snd_nxt = st["snd_nxt"]
        self._unacked = deque((seq, kind, bytes(p)) for seq, kind, p in st["unacked"])
        self._peer_wnd = st["peer_wnd"]
        self._rcv_nxt = st["rcv_nxt"]
        if st["rx"]:
            self._rxq.append(bytes(st["rx"]))
            self._rx_bytes = len(st["rx"])
        self._ooo = {seq: (kind, bytes(p)) for seq, kind, p in st["ooo"]}
        self._fin_rcvd = st["fin_rcvd"]
        self._fin_queued = st["fin_queued"]
        self._rd_shut = st["rd_shut"]
        self._wr_shut = st["wr_shut"]
        self._need_ack = self._ack_now = True  # tell the peer where we are
        self._signal()  # look at the rings and queues at once
        return self

    def _signal(self) -> None:
        """Make :meth:`fileno` readable (once: the eventfd counts, one write suffices);
        in poll mode, have the poller run the read callback instead."""
        if self._fire is not None:
            self._fire_pending = True
        else:
            self._signal_kernel()

    def _signal_kernel(self) -> None:
        if not self._wake_set:
            self._wake_set = True
            os.eventfd_write(self._wake, 1)

    def _fail(self, err: OSError) -> None:
        if self._error is None:
            self._error = err
        self._signal()

    # -- ConnectedSocket -----------------------------------------------------------------
    def fileno(self) -> int:
        return self._ep.fileno()

    def write_fileno(self) -> int | None:
        return None  # acks/credits arrive on the rx eventfd: fileno() covers both

    @property
    def peer_address(self) -> Address | None:
        return self._address

    def is_connected(self) -> int:
        """1 once the control socket is connected (like a TCP connect the kernel
        completed): the memif handshake itself needs the listener's accept loop, so it
        finishes lazily; until then ``send``/``read_into`` raise BlockingIOError, and a
        refused handshake ("ID not found", bad secret) raises ConnectionRefusedError."""
        if self._closed:
            raise ClosedResourceError("memif socket")
        if self._error is not None and self.iface is None:
            raise self._error
        return 1

    def _step_handshake(self) -> None:
        assert self._conn is not None
        try:
            iface = self._conn.step()
        except MemifDisconnected as e:
            self._conn = None
            self._fail(ConnectionRefusedError(errno.ECONNREFUSED, f"memif: {e.reason}"))
            return
        except OSError as e:
            self._conn = None
            self._fail(ConnectionRefusedError(errno.ECONNREFUSED, f"memif handshake failed: {e}"))
            return
        if iface is not None:
            self._ep.unregister(iface.ctrl_fileno())
            self._up(iface)
            self._signal()  # the owner may be waiting to send: look again

    def read_into(self, buf: memoryview) -> int:
        if self._closed:
            raise ClosedResourceError("memif socket")
        if self._rd_shut:
            return 0
        if self._rx_bytes:
            # Fast path: bytes already taken from the ring (fileno stays readable).
            n = self._copy_out(buf)
            self._window_update()
            if self._rx_bytes or self._fin_rcvd or self._error is not None:
                self._signal()
            return n
        self._direct = buf
        self._direct_n = 0
        try:
            if self._ring_hint:
                self._poll_service()
            else:
                self._service(signal=False)
        finally:
            self._direct = None
        n = self._direct_n
        if self._rx_bytes and n < len(buf):
            n += self._copy_out(buf[n:])
        if n:
            self._window_update()
            if self._rx_bytes or self._fin_rcvd or self._error is not None:
                self._signal()  # level-triggered contract: still readable
            return n
        if self.iface is None:
            if self._error is not None:
                raise self._error
            raise BlockingIOError(errno.EAGAIN, "memif handshake in progress")
        if self._fin_rcvd:
            return 0
        if self._error is not None:
            raise self._error
        raise BlockingIOError(errno.EAGAIN, "no data")



    def send(self, buffers: Sequence[Buffer]) -> int:
        if self._closed:
            raise ClosedResourceError("memif socket")
        if self._wr_shut:
            raise BrokenPipeError(errno.EPIPE, "memif socket shut down")
        # Light service: acks and data from the ring (plain memory reads); fds (control,
        # timer, wake-ups) and retransmission are left to the READABLE path, which the
        # owner runs anyway.
        if self.iface is None:
            self._service()
        elif not self._take_ring(True):
            self._check_rto()
        if self.iface is None:
            if self._error is not None:
                raise self._error
            raise BlockingIOError(errno.EAGAIN, "memif handshake in progress")
        if self._error is not None:
            raise self._error
        if self._peer_gone:
            raise BrokenPipeError(errno.EPIPE, "memif peer disconnected")
        credit = self._credit()
        if self._rexmit:
            self._transmit()
        if self._resend_from != self._snd_nxt:
            self._arm_retry()  # ring full: the timer brings us back
            raise BlockingIOError(errno.EAGAIN, "tx ring full")
        if credit <= 0:
            raise BlockingIOError(errno.EAGAIN, "no send credit")  # an ACK frame wakes us
        # Cut the buffers into segments of ``mss`` bytes (small buffers coalesce), each
        # built with one join: one copy per byte, whatever the buffer sizes.
        mss = self._mss
        payloads: list[bytes] = []
        cur: list[memoryview] = []
        room = mss
        full = False
        for b in buffers:
            mv = memoryview(b).cast("B")
            pos = 0
            ln = len(mv)
            while pos < ln:
                take = room if room < ln - pos else ln - pos
                cur.append(mv[pos:pos + take])
                pos += take
                room -= take
                if not room:
                    payloads.append(b"".join(cur))
                    cur = []
                    room = mss
                    if len(payloads) >= credit:
                        full = True  # out of credit, maybe mid-buffer: the rest waits
                        break
            if full:
                break
        if cur:
            payloads.append(b"".join(cur))
        if not payloads:
            raise BlockingIOError(errno.EAGAIN, "nothing to send")
        seq = self._snd_nxt
        for p in payloads:
            self._unacked.append((seq, DATA, p))
            seq = (seq + 1) & SEQ_MASK
        self._snd_nxt = seq
        self._transmit()
        self._rearm()
        return sum(len(p) for p in payloads)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._rd_shut = True
        if not self._wr_shut:
            self._wr_shut = True
            self._queue_fin()
            if self.iface is not None:
                try:
                    self._service()
                except OSError:
                    pass
        self._signal()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.iface is not None:
            try:
                if not self._wr_shut:
                    self._wr_shut = True
                    self._queue_fin()
                self._transmit()
            except OSError:
                pass
            reason = "closed" if self._resend_from == self._snd_nxt else "closed with data unsent"
            self.iface.close(reason)
            self.iface = None
        if self._conn is not None:
            self._conn.abort()
            self._conn = None
        for cb in self.on_close:
            cb()
        self.on_close = []
        self._ep.close()
        self._timer.close()
        os.close(self._wake)
        self._rxq.clear()
        self._unacked.clear()





    def _rearm(self) -> None:
        """Keep the timerfd armed no later than the next RTO or delayed-ACK deadline."""
        dl = self._rto_deadline
        ad = self._ack_deadline
        if ad and (not dl or ad < dl):
            dl = ad
        if dl:
            self._wake_at(dl, slack=1e-4)

    def _arm(self, delay: float) -> None:
        self._wake_at(time.monotonic() + delay)

    def _wake_at(self, deadline: float, slack: float = 0.0) -> None:
        """Be serviced again no later than ``deadline`` (CLOCK_MONOTONIC). Poll mode keeps
        the earliest deadline for its poller; interrupt mode re-arms the timerfd unless
        it already fires in time (within ``slack``)."""
        if self._fire is not None:
            if not self._due or deadline < self._due:
                self._due = deadline
            return
        now = time.monotonic()
        armed = self._timer.armed_until
        if armed <= now or armed > deadline + slack:
            self._timer.arm(max(deadline - now, 1e-5))

    def _arm_retry(self) -> None:
        self._arm(_RING_RETRY)

    def _service(self, signal: bool = True) -> None:
        """Drain wake-ups and the rx ring, handle acks and data, retransmit if due.

        One ``epoll_wait(0)`` on our own epoll fd says which fds are ready, so only
        those are read: a send or read costs one syscall here plus the peer's kick,
        instead of one per fd.
        """
        ctrl_ready = rx_ready = False
        timer_fd = self._timer.fd
        rx_fd = -2
        iface = self.iface
        if iface is not None:
            rx_fd = iface.fileno(0)
        for fd, _ in self._ep.poll(0):
            if fd == self._wake:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
                self._wake_set = False
            elif fd == timer_fd:
                self._timer.clear()
            elif fd == rx_fd:
                rx_ready = True
            else:
                ctrl_ready = True  # the control socket (or the connector's)
        if self.iface is None and self._conn is not None:
            if ctrl_ready:
                self._step_handshake()
            iface = self.iface
            if iface is None:
                if self._error is not None:
                    self._signal()
                return
            ctrl_ready = False
        if iface is None:
            if self._error is not None:
                self._signal()
            return
        if ctrl_ready and not self._peer_gone:
            try:
                iface.poll_control()
            except MemifDisconnected:
                self._peer_gone = True
        if rx_ready:
            iface.clear_interrupt(0)
        self._progress(signal)

    def _poll_service(self) -> None:
        """:meth:`_service` without the syscalls, for poll mode: the poller saw frames
        or a deadline passed, and fds (control socket, wake-ups) take the kernel path."""
        self._ring_hint = False
        if self.iface is None:
            return
        if self._due and time.monotonic() >= self._due:
            self._due = 0.0
        self._progress(False)

    def _progress(self, signal: bool) -> None:
        """The memory-only part of servicing: frames in, then retransmission and ACKs."""
        if self._take_ring(signal):
            return
        self._check_rto()
        self._transmit()
        self._rearm()


    def _take_ring(self, signal: bool) -> bool:
        """Process every frame in the rx ring; True when the peer is gone (EOF/reset
        pending). No syscalls unless something must be signalled."""
        iface = self.iface
        assert iface is not None
        while True:
            frames = iface.rx_burst(256)
            if not frames:
                break
            self._on_frames(frames)
            if len(frames) < 256:
                break
        iface.rx_release(0)
        if signal and (self._rx_bytes or self._fin_rcvd or self._error is not None):
            self._signal()  # data/EOF/error wait in user space
        if self._peer_gone:
            if not self._fin_rcvd and self._error is None:
                self._fail(ConnectionResetError(errno.ECONNRESET,
                                                f"memif peer disconnected: {iface.down_reason}"))
            self._signal()  # stay readable: EOF/error is pending
            return True
        return False


