"""One memif ring in shared memory and the four data-path loops over it.

Layout and counter rules: shared/notes/memif.md §3.5–3.6 (DPDK ``rte_eth_memif.c``:
``eth_memif_rx``/``eth_memif_tx``). Header fields are accessed through a ``cast('H')``
view so each head/tail publication is one aligned 16-bit store (§5 trap 8: Python has no
barriers; x86 total store order makes "write data, then store head" safe). Descriptors
are accessed through one ``cast('I')`` view over the whole descriptor array: word 0 =
flags | region << 16, word 1 = length, word 2 = offset, word 3 = metadata. No per-frame
``struct`` calls on the hot path.

Direction roles:

* producer ring, we own the buffers (client C2S): :meth:`Ring.tx_own`
* producer ring, the peer posted buffers (server S2C): :meth:`Ring.tx_posted`
* consumer ring of posted buffers (client S2C): :meth:`Ring.rx_posted` + :meth:`Ring.release`
* consumer ring, peer-owned buffers (server C2S): :meth:`Ring.rx_peer` + :meth:`Ring.release`

Received single-buffer frames are zero-copy memoryviews into the region; they stay valid
until the next ``rx_*``/``release`` on that ring (the slots go back to the peer then).
Chained frames are joined into ``bytes``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from ..errors import BrokenResourceError
from . import wire

__all__ = ["Ring"]

_FLAGS = wire.RING_FLAGS_OFF // 2
_HEAD = wire.RING_HEAD_OFF // 2
_TAIL = wire.RING_TAIL_OFF // 2
_NEXT = wire.DESC_FLAG_NEXT
_MASK_INT = wire.RING_FLAG_MASK_INT


class Ring:
    """A ring header + descriptors at ``offset`` of ``region``; ``regions`` resolve buffers."""

    def __init__(self, region: memoryview, offset: int, log2_size: int,
                 regions: Sequence[memoryview], eventfd: int) -> None:
        if offset % 8 or offset + wire.ring_bytes(log2_size) > len(region):
            raise ValueError(f"ring at {offset} (log2 {log2_size}) outside region of {len(region)} B")
        self.size = 1 << log2_size
        self.mask = self.size - 1
        self.log2 = log2_size
        hdr = region[offset:offset + wire.RING_DESC_OFF]
        self.h16 = hdr.cast("H")
        self.h32 = hdr.cast("I")
        self.desc = region[offset + wire.RING_DESC_OFF: offset + wire.ring_bytes(log2_size)].cast("I")
        self.regions = regions
        self.eventfd = eventfd
        #: Our private counter: next slot to produce/consume; ``_rel`` = released up to.
        self._pos = 0
        self._rel = 0
        #: Client-owned buffer layout: offset of the buffer of each slot, its region, bsize.
        self.slot_off: list[int] = []
        #: (region index, offset) as announced in ADD_RING (for handoff).
        self.where: tuple[int, int] = (0, offset)
        self.reg16 = 0
        self.bsize = 0

    # -- header ------------------------------------------------------------------------
    @property
    def cookie(self) -> int:
        return self.h32[0]

    @property
    def flags(self) -> int:
        return self.h16[_FLAGS]

    @flags.setter
    def flags(self, value: int) -> None:
        self.h16[_FLAGS] = value

    @property
    def head(self) -> int:
        return self.h16[_HEAD]

    @property
    def tail(self) -> int:
        return self.h16[_TAIL]

    def init_header(self) -> None:
        """Client side at creation: cookie, no flags, empty."""
        self.h32[0] = wire.COOKIE
        self.h16[_FLAGS] = 0
        self.h16[_HEAD] = 0
        self.h16[_TAIL] = 0
        self._pos = self._rel = 0

    def reset(self) -> None:
        """Server side on CONNECT: zero head and tail (DPDK ``memif_connect``)."""
        self.h16[_HEAD] = 0
        self.h16[_TAIL] = 0
        self._pos = self._rel = 0

    def set_buffers(self, region_index: int, base: int, bsize: int) -> None:
        """Client side: slot ``s`` owns buffer ``base + s*bsize`` of region ``region_index``."""
        self.reg16 = region_index << 16
        self.bsize = bsize
        self.slot_off = [base + s * bsize for s in range(self.size)]
        d = self.desc
        for s, off in enumerate(self.slot_off):
            i = s << 2
            d[i] = self.reg16
            d[i + 1] = bsize
            d[i + 2] = off
            d[i + 3] = 0

    def kick(self) -> None:
        """Wake the reader unless it set MASK_INT (it polls)."""
        if not self.h16[_FLAGS] & _MASK_INT:
            os.eventfd_write(self.eventfd, 1)

    def in_flight(self) -> int:
        """Produced but not yet consumed by the peer (client C2S)."""
        return (self._pos - self.h16[_TAIL]) & 0xFFFF

    def posted_free(self) -> int:
        """Buffers the peer posted that we have not filled yet (server S2C)."""
        return (self.h16[_HEAD] - self._pos) & 0xFFFF

    def resume(self) -> None:
        """After a handoff: our private counters restart at the tail we published
        (rx: consumed and released; tx: filled), which lives in shared memory."""
        self._pos = self._rel = self.h16[_TAIL]

    # -- producing -----------------------------------------------------------------------
    def tx_own(self, frames: Sequence[bytes | bytearray | memoryview], kick: bool = True) -> int:
        """Client C2S: copy frames into our buffers, publish head; returns frames taken."""
        h16 = self.h16
        head = self._pos
        free = self.size - ((head - h16[_TAIL]) & 0xFFFF)
        d = self.desc
        mask = self.mask
        bsize = self.bsize
        reg = self.reg16
        mv = self.regions[reg >> 16]
        slot_off = self.slot_off
        n = 0
        for f in frames:
            ln = len(f)
            if ln <= bsize:
                if not free:
                    break
                s = head & mask
                o = slot_off[s]
                mv[o:o + ln] = f
                i = s << 2
                d[i] = reg
                d[i + 1] = ln
                head += 1
                free -= 1
            else:
                need = -(-ln // bsize)
                if free < need:
                    break
                src = memoryview(f).cast("B")
                pos = 0
                while pos < ln:
                    s = head & mask
                    o = slot_off[s]
                    chunk = min(bsize, ln - pos)
                    mv[o:o + chunk] = src[pos:pos + chunk]
                    i = s << 2
                    pos += chunk
                    d[i] = reg | _NEXT if pos < ln else reg
                    d[i + 1] = chunk
                    head += 1
                free -= need
            n += 1
        if n:
            head &= 0xFFFF
            self._pos = head
            h16[_HEAD] = head  # publish after the data and descriptors (x86 TSO)
            if kick and not h16[_FLAGS] & _MASK_INT:
                os.eventfd_write(self.eventfd, 1)
        return n

    def tx_posted(self, frames: Sequence[bytes | bytearray | memoryview], kick: bool = True) -> int:
        """Server S2C: fill buffers the client posted (slots tail..head), publish tail."""
        try:
            return self._tx_posted(frames, kick)
        except (IndexError, ValueError):
            # a posted descriptor names an unknown region or a buffer past its end
            raise BrokenResourceError(errno.EPROTO, "memif peer posted an invalid buffer") from None

    def _tx_posted(self, frames: Sequence[bytes | bytearray | memoryview], kick: bool) -> int:
        h16 = self.h16
        tail = self._pos
        avail = (h16[_HEAD] - tail) & 0xFFFF
        d = self.desc
        mask = self.mask
        regions = self.regions
        n = 0
        for f in frames:
            ln = len(f)
            if not avail:
                break
            s = tail & mask
            i = s << 2
            w0 = d[i]
            cap = d[i + 1]
            if ln <= cap:
                off = d[i + 2]
                regions[w0 >> 16][off:off + ln] = f
                d[i] = w0 & 0xFFFF0000
                d[i + 1] = ln
                tail += 1
                avail -= 1
            else:
                # Chain over as many posted buffers as needed; undo on shortage so the
                # client's capacities stay intact for the next attempt.
                src = memoryview(f).cast("B")
                saved: list[tuple[int, int, int]] = []
                pos = 0
                t = tail
                a = avail
                while pos < ln and a:
                    s = t & mask
                    i = s << 2
                    w0 = d[i]
                    cap = d[i + 1]
                    saved.append((i, w0, cap))
                    off = d[i + 2]
                    chunk = min(cap, ln - pos)
                    regions[w0 >> 16][off:off + chunk] = src[pos:pos + chunk]
                    pos += chunk
                    d[i] = (w0 & 0xFFFF0000) | (_NEXT if pos < ln else 0)
                    d[i + 1] = chunk
                    t += 1
                    a -= 1
                    if chunk == 0 and pos < ln:
                        break  # a zero-capacity buffer: cannot make progress
                if pos < ln:
                    for i, w0, cap in saved:
                        d[i] = w0
                        d[i + 1] = cap
                    break
                tail = t
                avail = a
            n += 1
        if n:
            tail &= 0xFFFF
            self._pos = tail
            h16[_TAIL] = tail
            if kick and not h16[_FLAGS] & _MASK_INT:
                os.eventfd_write(self.eventfd, 1)
        return n

    # -- consuming -----------------------------------------------------------------------
    def _gather(self, start: int, avail: int) -> tuple[bytes, int] | None:
        """Join a chained frame starting at counter ``start``; None if incomplete."""
        d = self.desc
        mask = self.mask
        regions = self.regions
        parts = []
        k = 0
        while k < avail:
            i = ((start + k) & mask) << 2
            w0 = d[i]
            ln = d[i + 1]
            off = d[i + 2]
            parts.append(regions[w0 >> 16][off:off + ln])
            k += 1
            if not w0 & _NEXT:
                return b"".join(parts), k
        return None

    def _rx(self, limit_counter: int, maxn: int) -> list[memoryview | bytes]:
        pos = self._pos
        avail = (limit_counter - pos) & 0xFFFF
        d = self.desc
        mask = self.mask
        regions = self.regions
        out: list[memoryview | bytes] = []
        append = out.append
        while avail and maxn:
            i = (pos & mask) << 2
            w0 = d[i]
            if w0 & _NEXT:
                got = self._gather(pos, avail)
                if got is None:
                    break  # the producer publishes whole frames; be safe anyway
                append(got[0])
                pos += got[1]
                avail -= got[1]
            else:
                off = d[i + 2]
                append(regions[w0 >> 16][off:off + d[i + 1]])
                pos += 1
                avail -= 1
            maxn -= 1
        self._pos = pos & 0xFFFF
        return out

    def rx_posted(self, maxn: int) -> list[memoryview | bytes]:
        """Client S2C: frames the server filled (last_tail..tail). Releases the previous batch."""
        if self._rel != self._pos:
            self.release()
        try:
            return self._rx(self.h16[_TAIL], maxn)
        except IndexError:
            raise BrokenResourceError(errno.EPROTO, "memif descriptor names an unknown region") from None

    def rx_peer(self, maxn: int) -> list[memoryview | bytes]:
        """Server C2S: frames the client produced (last_head..head). Releases the previous batch.

        Descriptors come from the peer: a region index it never added raises
        BrokenResourceError (that connection only); offsets/lengths past a region's end
        only shorten the view (slicing is bounds-safe), they never read outside it.
        """
        if self._rel != self._pos:
            self.release()
        try:
            return self._rx(self.h16[_HEAD], maxn)
        except IndexError:
            raise BrokenResourceError(errno.EPROTO, "memif descriptor names an unknown region") from None

    def release(self) -> None:
        """Give consumed slots back to the peer.

        Client S2C: re-post our buffers with full capacity and *flags cleared* (§5 trap 5:
        DPDK 22.11's tx leaves the first descriptor's flags), head = last_tail + size.
        Server C2S: publish tail.
        """
        pos = self._pos
        if self.slot_off:  # we own the buffers: client S2C
            # The server writes only length and flags (DPDK ``eth_memif_tx`` non-zero-copy,
            # and our tx_posted): offsets stay ours, so re-posting is two stores per slot.
            d = self.desc
            mask = self.mask
            reg = self.reg16
            bsize = self.bsize
            r = self._rel
            while r != pos:
                i = (r & mask) << 2
                d[i] = reg
                d[i + 1] = bsize
                r = (r + 1) & 0xFFFF
            self.h16[_HEAD] = (pos + self.size) & 0xFFFF
        else:
            self.h16[_TAIL] = pos
        self._rel = pos

    def rx_ready(self) -> bool:
        """Consumer side: has the peer published frames we have not taken yet? (One
        16-bit load: what a busy poller checks between bursts.)"""
        return self.h16[_TAIL if self.slot_off else _HEAD] != self._pos

    def post_all(self) -> None:
        """Client S2C right after CONNECTED: offer every buffer (§3.6: not before)."""
        self._pos = self._rel = self.h16[_TAIL]
        self.release()
