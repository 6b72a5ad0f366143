"""Reliable, ordered delivery of segments over lossy memif frames: the stream's protocol.

:class:`ReliableSegments` holds the sender and receiver state of one
:class:`~transport.memif.stream.MemifStream` (sequence numbers, the retransmission
queue, the reassembly of segments past a hole, delayed ACKs) and the methods that
turn frames into state and state into frames; :mod:`.stream` holds the fds, readiness
and the ConnectedSocket API. It is a base class rather than a member object so that
the per-frame code reads ``self._x`` exactly as before the split: no extra attribute
hop per record. The wire format and the algorithm are in :mod:`.stream`'s docstring.
"""

from __future__ import annotations

import errno
import itertools
import struct
import time
from collections import deque

from .interface import MemifInterface

__all__ = ["ACK", "DATA", "FIN", "HDR", "RST", "ReliableSegments"]

HDR = struct.Struct("<BBHII")
DATA, ACK, FIN, RST = 1, 2, 3, 4
SEQ_MASK = 0xFFFFFFFF  # sequence numbers are u32 and wrap
_RTO_MIN = 0.02
_RTO_MAX = 1.0
_ACK_DELAY = 0.0005  # delayed ACK: a reply within this carries the ACK (no extra kick)


class ReliableSegments:
    """Sender and receiver state of one stream; the subclass supplies the interface,
    ``_fail`` (record an error and signal readiness) and ``_arm_retry`` (look at the ring
    again soon)."""

    iface: MemifInterface | None
    _window: int
    _mss: int
    _ack_every: int
    _rcvbuf: int
    _drop_every: int

    def _fail(self, err: OSError) -> None:
        raise NotImplementedError

    def _arm_retry(self) -> None:
        raise NotImplementedError

    def _init_segments(self) -> None:
        self._drops = 0
        self.retransmits = 0
        self._rx_count = 0
        # sender
        self._snd_una = 0
        self._snd_nxt = 0
        self._unacked: deque[tuple[int, int, bytes]] = deque()  # (seq, type, payload)
        self._resend_from = 0  # first segment not yet put in the ring (ring-full backlog)
        self._peer_wnd = 0
        self._rto = _RTO_MIN
        self._rto_deadline = 0.0
        self._dup_acks = 0
        self._recover = 0  # no fast retransmit again until snd_una reaches this
        self._rexmit = False  # resend the oldest unacked segment at the next transmit
        self._fin_queued = False
        self._wr_shut = False
        # receiver
        self._rcv_nxt = 0
        self._rxq: deque[bytes] = deque()
        self._rx_off = 0
        self._rx_bytes = 0
        # read_into's buffer while it services the ring: in-order data goes straight
        # there (one copy out of the ring instead of two) while it fits and nothing
        # older waits in _rxq.
        self._direct: memoryview | None = None
        self._direct_n = 0
        self._fin_rcvd = False
        self._rd_shut = False
        self._need_ack = False
        self._ack_now = False  # send the pending ACK without delay
        self._rx_unacked = 0  # in-order segments taken since our last ACK
        self._ack_deadline = 0.0
        self._ooo: dict[int, tuple[int, bytes]] = {}  # out-of-order segments by seq
        self._adv_wnd = 0

    def _credit(self) -> int:
        inflight = (self._snd_nxt - self._snd_una) & SEQ_MASK
        return min(self._peer_wnd, self._window) - inflight

    def _free_wnd(self) -> int:
        return max(0, min(self._window, (self._rcvbuf - self._rx_bytes) // self._mss))

    def _queue_fin(self) -> None:
        if self._fin_queued:
            return
        self._fin_queued = True
        self._unacked.append((self._snd_nxt, FIN, b""))
        self._snd_nxt = (self._snd_nxt + 1) & SEQ_MASK

    def _frame(self, kind: int, seq: int, payload: bytes) -> bytes:
        wnd = self._free_wnd()
        self._adv_wnd = wnd
        return HDR.pack(kind, 0, wnd, seq, self._rcv_nxt) + payload

    def _transmit(self) -> None:
        """Put every segment from ``_resend_from`` in the ring (as far as it fits)."""
        iface = self.iface
        if iface is None:
            return
        if self._rexmit and self._unacked and self._resend_from != self._snd_una:
            s, k, p = self._unacked[0]
            if iface.tx_burst([self._frame(k, s, p)]):
                self._rexmit = False
                self._ack_sent()
                self.retransmits += 1
        start = (self._resend_from - self._snd_una) & SEQ_MASK
        if start < len(self._unacked):
            frames = [self._frame(k, s, p) for s, k, p in itertools.islice(self._unacked, start, None)]
            n = iface.tx_burst(frames)
            if n:
                self._ack_sent()  # every frame carried the current ack
                self._resend_from = (self._resend_from + n) & SEQ_MASK
                if not self._rto_deadline:
                    self._rto_deadline = time.monotonic() + self._rto
            if n < len(frames):
                self._arm_retry()
        self._flush_ack()

    def _flush_ack(self) -> None:
        """Send a pure ACK now when due, else let it wait (delayed ACK): a reply sent
        within ``_ACK_DELAY`` carries it for free, and each pure ACK is a kick that
        wakes the peer. Due: a hole or duplicate (fast retransmit needs it), FIN, a
        window update, a quarter window received, or the delay ran out."""
        if not self._need_ack or self.iface is None:
            return
        now = time.monotonic()
        if self._ack_now or self._rx_unacked >= self._ack_every or \
                (self._ack_deadline and now >= self._ack_deadline):
            if self.iface.tx_burst([self._frame(ACK, self._snd_nxt, b"")]):
                self._ack_sent()
            else:
                self._arm_retry()
        elif not self._ack_deadline:
            self._ack_deadline = now + _ACK_DELAY

    def _ack_sent(self) -> None:
        self._need_ack = self._ack_now = False
        self._rx_unacked = 0
        self._ack_deadline = 0.0

    def _check_rto(self) -> None:
        """Retransmission timeout: resend the oldest segment, back off."""
        if self._unacked and self._rto_deadline:
            now = time.monotonic()
            if now >= self._rto_deadline:
                self._rexmit = True
                self._recover = self._snd_nxt
                self._rto = min(self._rto * 2, _RTO_MAX)
                self._rto_deadline = now + self._rto

    def _on_frames(self, frames: list[memoryview | bytes]) -> None:
        unpack = HDR.unpack_from
        hsize = HDR.size
        for f in frames:
            if len(f) < hsize:
                continue  # not ours: ignore runts
            kind, _flags, wnd, seq, ack = unpack(f, 0)
            # acknowledgement
            acked = (ack - self._snd_una) & SEQ_MASK
            if 0 < acked <= ((self._snd_nxt - self._snd_una) & SEQ_MASK):
                for _ in range(acked):
                    self._unacked.popleft()
                self._snd_una = ack
                if ((self._resend_from - ack) & SEQ_MASK) > ((self._snd_nxt - ack) & SEQ_MASK):
                    self._resend_from = ack
                self._rto = _RTO_MIN
                self._dup_acks = 0
                if self._unacked:
                    self._rto_deadline = time.monotonic() + self._rto
                    if ((self._recover - ack) & SEQ_MASK) - 1 < 0x7FFFFFFF:
                        # partial ack during recovery (NewReno): the next hole is lost too
                        self._rexmit = True
                else:
                    self._rto_deadline = 0.0
                self._peer_wnd = wnd
            elif acked == 0:
                self._peer_wnd = wnd
                if kind == ACK and self._unacked and self._resend_from != self._snd_una \
                        and ((self._snd_una - self._recover) & SEQ_MASK) < 0x80000000:
                    # The receiver re-acks when a segment arrives past a hole: after 3
                    # duplicates resend the oldest unacked segment (fast retransmit),
                    # once per window (until snd_una passes ``_recover``).
                    self._dup_acks += 1
                    if self._dup_acks >= 3:
                        self._dup_acks = 0
                        self._rexmit = True
                        self._recover = self._snd_nxt
            if kind == DATA or kind == FIN:
                if self._drop_every and kind == DATA:
                    self._rx_count += 1
                    if self._rx_count % self._drop_every == 0:
                        self._drops += 1
                        continue
                self._need_ack = True
                if seq != self._rcv_nxt:
                    self._ack_now = True  # duplicate or hole: re-ack at once
                    ahead = (seq - self._rcv_nxt) & SEQ_MASK
                    if ahead < self._window and seq not in self._ooo:
                        # hold segments past a hole so one retransmission fills it
                        self._ooo[seq] = (kind, bytes(f[hsize:]))
                    continue
                self._deliver(kind, f[hsize:])
                while self._ooo:
                    nxt = self._ooo.pop(self._rcv_nxt, None)
                    if nxt is None:
                        break
                    self._deliver(*nxt)
            elif kind == RST:
                self._fail(ConnectionResetError(errno.ECONNRESET, "memif peer reset"))

    def _deliver(self, kind: int, payload: bytes | memoryview) -> None:
        self._rcv_nxt = (self._rcv_nxt + 1) & SEQ_MASK
        self._rx_unacked += 1
        if kind == FIN:
            self._fin_rcvd = True
            self._ack_now = True
        elif not self._rd_shut:
            direct = self._direct
            if direct is not None and not self._rxq:
                start = self._direct_n
                end = start + len(payload)
                if end <= len(direct):
                    direct[start:end] = payload
                    self._direct_n = end
                    return
            data = bytes(payload)
            self._rxq.append(data)
            self._rx_bytes += len(data)

    def _copy_out(self, buf: memoryview) -> int:
        want = len(buf)
        n = 0
        q = self._rxq
        while n < want and q:
            chunk = q[0]
            off = self._rx_off
            take = min(len(chunk) - off, want - n)
            buf[n:n + take] = chunk[off:off + take]
            n += take
            if off + take == len(chunk):
                q.popleft()
                self._rx_off = 0
            else:
                self._rx_off = off + take
        self._rx_bytes -= n
        return n

    def _window_update(self) -> None:
        """ACK at once when a small advertised window has opened substantially."""
        if self._adv_wnd < self._window // 2 and self._free_wnd() >= self._window // 2:
            self._need_ack = self._ack_now = True
            self._flush_ack()
