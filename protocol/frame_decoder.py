"""Decoding msgr2.1 banners and frames, BufferedProtocol style (zero copy).

The transport asks ``get_buffer()`` for memory, ``recv_into``s it and reports
``buffer_updated(n)``; ``next_frame()`` then returns whole frames whose segments are
memoryviews into that very memory. Every size cap is checked from the preamble before any
memory is allocated for a body. The layout is in :mod:`protocol.frames`.
"""

from __future__ import annotations

from crc32c import crc32c as _crc

from .accel import ACCEL
from .errors import FrameError, LocalProtocolError, RemoteProtocolError
from .frame_format import (
    BANNER_LEN, BANNER_PAYLOAD, BANNER_PREFIX, BANNER_SIZE, EPILOGUE, EPILOGUE_SIZE, KNOWN_TAG,
    LATE_STATUS_ABORTED, LATE_STATUS_COMPLETE, MASK32, MAX_SEGMENTS, MSGR1_PREFIX, PREAMBLE,
    PREAMBLE_SIZE, TAG_MESSAGE, U32, Banner, Buffer, Frame, FrameLimits, Tag, tag_name,
)

__all__ = ["FrameDecoder", "scan_message_python"]

# Bound methods looked up once, as assigned (not imported) globals: the per-message path
# calls them for every frame, and CPython 3.11 compiles ``imported_name.method()`` as an
# attribute load that builds a bound method per call.
_unpack_preamble = PREAMBLE.unpack_from
_unpack_epilogue = EPILOGUE.unpack_from
_unpack_u32 = U32.unpack_from
if ACCEL is not None:
    _scan = ACCEL.scan_message  # the compiled MESSAGE-frame scan
#: receive memory: not zeroed where the extension can make it so (the decoder reads only
#: below ``_end``, what the socket wrote), a zeroed bytearray otherwise
_new_buffer = bytearray if ACCEL is None else ACCEL.new_buffer

# Parsed preamble: (tag, nseg, len0, len1, len2, len3, flags, total on-wire size).
_Header = tuple[int, int, int, int, int, int, int, int]

_MIN_CHUNK = 64
#: the empty middle segment handed out by next_message (one object, not a slice per frame)
_EMPTY_VIEW = memoryview(b"")
# Below this much free tail a chunk is retired: a recv into a few bytes costs a
# syscall for almost nothing, while moving a small partial frame is cheap.
_MIN_TAIL = 2048


def scan_message_python(mv: memoryview, start: int, end_avail: int, segment_max: int,
                        data_max: int) -> tuple[int, tuple[memoryview, ...]] | None:
    """``(new_start, segments)`` of a whole, valid MESSAGE frame of 1, 2 or 4 segments
    (empty middle) at ``mv[start:end_avail]``, or ``None``: not on the fast path (the
    general decoder decides and words any error). ``protocol._accel.scan_message`` is
    its compiled twin, with the same signature."""
    if end_avail - start < PREAMBLE_SIZE:
        return None
    (tag, nseg, l0, _a0, l1, _a1, l2, _a2, l3, _a3, _flags, _rsv,
     crc) = _unpack_preamble(mv, start)
    if tag != TAG_MESSAGE or l2 or not l0 or l0 > segment_max:
        return None
    if nseg == 1:
        if l1 or l3:
            return None
        end = start + PREAMBLE_SIZE + 4 + l0
    elif nseg == 2:
        if l3 or not l1 or l1 > segment_max:
            return None
        end = start + PREAMBLE_SIZE + 4 + l0 + l1 + EPILOGUE_SIZE
    elif nseg == 4:
        if not l3 or l1 > segment_max or l3 > data_max:
            return None
        end = start + PREAMBLE_SIZE + 4 + l0 + l1 + l3 + EPILOGUE_SIZE
    else:
        return None
    if end > end_avail:
        return None
    if _crc(mv[start:start + 28], MASK32) ^ MASK32 != crc:
        return None
    p = start + PREAMBLE_SIZE
    seg0 = mv[p:p + l0]
    p += l0
    if _crc(seg0, 0) ^ MASK32 != _unpack_u32(mv, p)[0]:
        return None
    if nseg == 1:
        return end, (seg0,)
    p += 4
    seg1 = mv[p:p + l1]
    if nseg == 2:
        late, c1, c2, c3 = _unpack_epilogue(mv, p + l1)
        if late != LATE_STATUS_COMPLETE or c2 or c3 or _crc(seg1, 0) ^ MASK32 != c1:
            return None
        return end, (seg0, seg1)
    p += l1
    seg3 = mv[p:p + l3]
    late, c1, c2, c3 = _unpack_epilogue(mv, p + l3)
    if (late != LATE_STATUS_COMPLETE or c2 != MASK32
            or (_crc(seg1, 0) ^ MASK32 if l1 else MASK32) != c1  # empty: ~0, no call
            or _crc(seg3, 0) ^ MASK32 != c3):
        return None
    return end, (seg0, seg1, _EMPTY_VIEW, seg3)


class FrameDecoder:
    """Incremental decoder, BufferedProtocol style. Feed any split of bytes; get whole frames.

    Memory discipline (why segments can be handed out as views):

    - bytes are received into a chunk ``bytearray``; a completed frame's segments are
      memoryviews *into* that chunk, and the decoder never writes again into memory it
      has handed out (it only appends past ``_end``);
    - when a chunk's tail runs out, a fresh chunk is allocated and only the leftover
      partial bytes move (at most once per frame: a frame that fits a chunk is moved to
      the start of a fresh one, where it completes);
    - a frame bigger than the chunk gets its own exactly-sized ``bytearray``: the prefix
      already received is copied once, then ``get_buffer()`` returns the rest of *that*
      buffer so the socket fills it directly.

    A handed-out segment keeps its whole chunk alive: copy small payloads that are kept
    long. The caller should drain ``next_frame()`` (until ``None``) after each
    ``buffer_updated()``/``feed()``; that also lets big frames get their own buffer.
    After a ``FrameError`` the stream is unusable: fault the connection.
    """

    __slots__ = (
        "_big",
        "_big_fill",
        "_big_hdr",
        "_big_mv",
        "_buf",
        "_chunk_size",
        "_control_max",
        "_data_max",
        "_end",
        "_hdr",
        "_last_big",
        "_last_len",
        "_may_banner",
        "_min_tail",
        "_mv",
        "_segment_max",
        "_start",
        "aborted_frames",
        "limits",
    )

    def __init__(self, limits: FrameLimits = FrameLimits(), chunk_size: int = 256 * 1024) -> None:
        if type(chunk_size) is not int or chunk_size < _MIN_CHUNK:
            raise LocalProtocolError(f"chunk_size must be an int >= {_MIN_CHUNK}", "bad_limits")
        self.limits = limits
        self.aborted_frames = 0
        self._chunk_size = chunk_size
        self._min_tail = min(_MIN_TAIL, chunk_size // 8)
        # Copied out of the frozen dataclass: attribute lookups on self are cheaper.
        self._control_max = limits.control_max
        self._segment_max = limits.segment_max
        self._data_max = limits.data_max
        self._buf = _new_buffer(chunk_size)
        self._mv = memoryview(self._buf)
        self._start = 0  # first byte not yet returned (as banner or frame)
        self._end = 0  # first byte not yet received
        self._hdr: _Header | None = None  # validated preamble of the frame at _start
        self._big: bytearray | None = None  # dedicated buffer of an oversized frame
        self._big_mv = memoryview(b"")
        self._big_fill = 0
        self._big_hdr: _Header | None = None
        self._last_big = False  # did the last get_buffer() lend the big buffer?
        self._last_len = 0
        self._may_banner = True  # nothing consumed yet: a banner may still come

    # -- receiving -------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view to ``recv_into`` next (never empty). ``sizehint`` is ignored:
        the decoder knows better how much it wants (the rest of a big frame)."""
        big = self._big
        if big is not None and self._big_fill < len(big):
            view = self._big_mv[self._big_fill:]
            self._last_big = True
            self._last_len = len(view)
            return view
        if self._hdr is None and not self._may_banner and self._end - self._start >= PREAMBLE_SIZE:
            # Learn the pending frame's size early (feed() path) so a big frame gets its
            # own buffer now rather than being moved chunk to chunk. A bad preamble is
            # reported by next_frame(), not here: the transport only moves bytes.
            try:
                self._hdr = self._parse_preamble(self._start)
            except FrameError:
                pass
        hdr = self._hdr
        start, end, size = self._start, self._end, len(self._buf)
        if hdr is not None and big is None and end - start < hdr[7]:
            total = hdr[7]
            if start + total > size:
                if total > self._chunk_size:
                    self._enter_big(hdr)
                    return self.get_buffer(sizehint)
                self._rotate(self._chunk_size)  # now it fits: moved once, never again
            # else: the incomplete frame fits this chunk; let the socket fill its tail
            # (>= 1 byte since the frame is incomplete) rather than move the prefix.
        elif size - end < self._min_tail:
            self._rotate(max(self._chunk_size, 2 * (end - start) + self._min_tail))
        view = self._mv[self._end:]
        self._last_big = False
        self._last_len = len(view)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        """The caller wrote ``nbytes`` into the view from the last ``get_buffer()``."""
        if not 0 <= nbytes <= self._last_len:
            raise LocalProtocolError(
                f"buffer_updated({nbytes}) but the last get_buffer() lent {self._last_len} bytes",
                "bad_buffer")
        self._last_len = 0  # one update per lent view: a second one must ask again
        if self._last_big:
            self._big_fill += nbytes
        else:
            self._end += nbytes

    def feed(self, data: Buffer) -> None:
        """Copy ``data`` in (tests, stacks that hand us bytes instead of filling a view)."""
        src = data if isinstance(data, memoryview) else memoryview(data)
        src = src.cast("B") if src.format != "B" or src.ndim != 1 else src
        pos, size = 0, len(src)
        while pos < size:
            view = self.get_buffer(size - pos)
            n = min(len(view), size - pos)
            view[:n] = src[pos:pos + n]
            self.buffer_updated(n)
            pos += n

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a banner or frames."""
        return self._end - self._start + (self._big_fill if self._big is not None else 0)

    def take_pending(self) -> bytes:
        """Remove and return the unparsed bytes (to hand the connection to another process).

        Bytes come back in stream order; the decoder is left empty and reusable.
        """
        parts = []
        if self._big is not None:
            parts.append(bytes(self._big_mv[:self._big_fill]))
        parts.append(bytes(self._mv[self._start:self._end]))
        self._big = None
        self._big_mv = memoryview(b"")
        self._big_fill = 0
        self._big_hdr = None
        self._hdr = None
        self._start = self._end  # keep the chunk: nothing past _end was handed out
        self._last_len = 0
        return b"".join(parts)

    def _rotate(self, size: int) -> None:
        """Retire the current chunk: allocate a fresh one and move the leftover bytes."""
        leftover = self._mv[self._start:self._end]
        buf = _new_buffer(size)
        n = len(leftover)
        buf[:n] = leftover
        self._buf = buf
        self._mv = memoryview(buf)
        self._start = 0
        self._end = n
        self._last_len = 0

    def _enter_big(self, hdr: _Header) -> None:
        """Give the (validated, size-capped) pending frame its own exact-size buffer."""
        big = _new_buffer(hdr[7])
        have = self._end - self._start
        big[:have] = self._mv[self._start:self._end]
        self._big = big
        self._big_mv = memoryview(big)
        self._big_fill = have
        self._big_hdr = hdr
        self._hdr = None
        # The chunk keeps its free tail for the bytes that follow the big frame.
        self._start = self._end
        self._last_len = 0

    # -- parsing ---------------------------------------------------------------------

    def next_banner(self) -> Banner | None:
        """The peer's banner, or ``None`` if more bytes are needed.

        Only valid before anything else was consumed. A msgr1 banner (``b"ceph v027"``)
        or any other non-msgr2 prefix raises ``RemoteProtocolError``.
        """
        if not self._may_banner:
            raise LocalProtocolError("next_banner() after a banner or frame was consumed",
                                     "bad_state")
        start, avail = self._start, self._end - self._start
        head = bytes(self._mv[start:start + min(avail, BANNER_SIZE)])
        k = min(len(head), len(BANNER_PREFIX))
        if head[:k] != BANNER_PREFIX[:k]:
            if head.startswith(MSGR1_PREFIX):
                raise RemoteProtocolError(
                    "peer speaks msgr1 (banner 'ceph v027'); only msgr2 is supported: "
                    "enable ms_bind_msgr2 / use a v2 address on the peer", "msgr1")
            raise RemoteProtocolError(
                f"peer did not send a msgr2 banner (got {head[:k]!r}); not a Ceph msgr2 peer",
                "bad_banner")
        if avail < len(BANNER_PREFIX) + BANNER_LEN.size:
            return None
        (plen,) = BANNER_LEN.unpack_from(head, len(BANNER_PREFIX))
        if plen != BANNER_PAYLOAD.size:
            raise RemoteProtocolError(
                f"banner payload length must be {BANNER_PAYLOAD.size}, got {plen}", "bad_banner")
        if avail < BANNER_SIZE:
            return None
        supported, required = BANNER_PAYLOAD.unpack_from(head, len(BANNER_PREFIX) + 2)
        self._start = start + BANNER_SIZE
        self._may_banner = False
        return Banner(supported, required)

    def next_frame(self) -> Frame | None:
        """The next whole frame, or ``None`` if more bytes are needed.

        Raises ``FrameError`` on a bad preamble crc, a segment count outside 1..4 (or
        other than 1 for a non-MESSAGE frame), an empty last segment, an unknown tag, a
        size cap, a bad segment crc or a bad late_status. Aborted frames are skipped
        (counted in ``aborted_frames``).
        """
        self._may_banner = False
        while True:
            big = self._big
            if big is not None:
                if self._big_fill < len(big):
                    return None
                hdr = self._big_hdr
                assert hdr is not None
                frame = self._decode_body(self._big_mv, 0, hdr)
                self._big = None
                self._big_mv = memoryview(b"")
                self._big_hdr = None
                self._big_fill = 0
            else:
                start = self._start
                avail = self._end - start
                hdr = self._hdr
                if hdr is None:
                    if avail < PREAMBLE_SIZE:
                        return None
                    hdr = self._hdr = self._parse_preamble(start)
                if avail < hdr[7]:
                    return None
                frame = self._decode_body(self._mv, start, hdr)
                # Only consume once the frame validated: a retry re-raises the same error.
                self._start = start + hdr[7]
                self._hdr = None
            if frame is not None:
                return frame
            self.aborted_frames += 1

    def next_message_python(self) -> tuple[memoryview, ...] | None:
        """The segments of the next frame if it is a whole, valid MESSAGE frame of 1, 2 or
        4 segments (with an empty middle: what every sender without a middle sends) lying
        in the current chunk, consumed; else ``None`` and nothing consumed.

        The per-message fast path: one call instead of ``next_frame`` and its helpers,
        and no ``Frame`` object. It never raises and accepts only frames ``next_frame``
        accepts. On ``None`` the caller asks ``next_frame()``, which handles everything
        else (more bytes needed, control frames, big frames, aborted frames) and raises
        the precise error for a bad frame, so errors are worded in one place.
        """
        if self._hdr is not None or self._big is not None or self._may_banner:
            return None
        r = scan_message_python(self._mv, self._start, self._end, self._segment_max,
                                self._data_max)
        if r is None:
            return None
        self._start = r[0]
        return r[1]

    if ACCEL is None:
        next_message = next_message_python
    else:
        def next_message(self) -> tuple[memoryview, ...] | None:
            """:meth:`next_message_python`, compiled (protocol._accel.scan_message): the
            same frames accepted, the same segments, the same bytes consumed."""
            if self._hdr is not None or self._big is not None or self._may_banner:
                return None
            r = _scan(self._mv, self._start, self._end, self._segment_max, self._data_max)
            if r is None:
                return None
            self._start = r[0]
            segs: tuple[memoryview, ...] = r[1]
            return segs

    def message_span(self) -> tuple[memoryview, int, int, int, int] | None:
        """``(chunk, start, end, segment_max, data_max)``: where whole MESSAGE frames may
        lie for a batch scan (:func:`protocol.message.decode_messages`), or ``None``
        while the next frame is not on the fast path's ground (a banner may still come,
        a big frame has its own buffer, a pending preamble was already parsed)."""
        if self._hdr is not None or self._big is not None or self._may_banner:
            return None
        return self._mv, self._start, self._end, self._segment_max, self._data_max

    def advance(self, chunk: memoryview, expect: int, to: int) -> bool:
        """Consume up to offset ``to`` of the span :meth:`message_span` returned, if
        nothing moved since (the same chunk, its first unconsumed byte still at
        ``expect``); False, and nothing consumed, if it did: the batch is stale."""
        if (self._start != expect or self._mv is not chunk or self._hdr is not None
                or self._big is not None):
            return False
        self._start = to
        return True

    def _parse_preamble(self, off: int) -> _Header:
        """Validate the preamble at ``off`` and return its header; allocates nothing."""
        (tag, nseg, l0, _a0, l1, _a1, l2, _a2, l3, _a3, flags, _rsv,
         crc) = _unpack_preamble(self._buf, off)
        got = _crc(self._mv[off:off + 28], MASK32) ^ MASK32
        if got != crc:
            raise FrameError(f"preamble crc mismatch (got {got:#010x}, frame says {crc:#010x}):"
                             " corrupt stream", "bad_crc")
        if not 1 <= nseg <= MAX_SEGMENTS:
            raise FrameError(f"segment count {nseg} outside 1..{MAX_SEGMENTS}", "bad_segments")
        lens = (l0, l1, l2, l3)
        if nseg > 1 and lens[nseg - 1] == 0:
            raise FrameError(f"last of {nseg} segments is empty (senders trim empty tails)",
                             "bad_segments")
        if any(lens[nseg:]):
            raise FrameError(f"length given for a segment beyond nseg={nseg}", "bad_segments")
        if not KNOWN_TAG[tag]:
            raise FrameError(f"unknown frame tag {tag}", "bad_tag")
        if tag == TAG_MESSAGE:
            seg_max = self._segment_max
            if l0 > seg_max or l1 > seg_max or l2 > seg_max or l3 > self._data_max:
                caps = (seg_max, seg_max, seg_max, self._data_max)
                i = next(i for i in range(4) if lens[i] > caps[i])
                raise FrameError(f"MESSAGE segment {i} announces {lens[i]} bytes, cap {caps[i]}",
                                 "oversize")
        else:
            # Control payloads are one segment; rejecting more here means callers can
            # never silently ignore segments they do not look at.
            if nseg != 1:
                raise FrameError(f"{Tag(tag).name} frame has {nseg} segments; control frames"
                                 " carry exactly one", "bad_segments")
            if l0 > self._control_max:
                raise FrameError(f"{Tag(tag).name} frame announces {l0} bytes, "
                                 f"control cap {self._control_max}", "oversize")
        total = PREAMBLE_SIZE + l0 + l1 + l2 + l3
        if l0:
            total += 4
        if nseg > 1:
            total += EPILOGUE_SIZE
        return (tag, nseg, l0, l1, l2, l3, flags, total)

    def _decode_body(self, mv: memoryview, off: int, hdr: _Header) -> Frame | None:
        """Check crcs and slice segments of a complete frame; ``None`` if it was aborted."""
        tag, nseg, l0, l1, l2, l3, flags, _total = hdr
        p = off + PREAMBLE_SIZE
        seg0 = mv[p:p + l0]
        if l0:
            p += l0
            (want,) = _unpack_u32(mv, p)
            p += 4
            if _crc(seg0, 0) ^ MASK32 != want:
                raise FrameError(f"{tag_name(tag)} segment 0 crc mismatch: corrupt stream",
                                 "bad_crc")
        if nseg == 1:
            return Frame(tag, (seg0,), flags)
        # Unrolled per segment count: only present segments are sliced and crc'd.
        seg1 = mv[p:p + l1]
        p += l1
        if nseg == 2:
            late, c1, c2, c3 = _unpack_epilogue(mv, p)
            if late != LATE_STATUS_COMPLETE:
                return _aborted(late)
            if _crc(seg1, 0) ^ MASK32 != c1 or c2 or c3:
                raise _epilogue_error(tag)
            return Frame(tag, (seg0, seg1), flags)
        seg2 = mv[p:p + l2]
        p += l2
        if nseg == 3:
            late, c1, c2, c3 = _unpack_epilogue(mv, p)
            if late != LATE_STATUS_COMPLETE:
                return _aborted(late)
            if (_crc(seg1, 0) ^ MASK32 != c1 or _crc(seg2, 0) ^ MASK32 != c2 or c3):
                raise _epilogue_error(tag)
            return Frame(tag, (seg0, seg1, seg2), flags)
        seg3 = mv[p:p + l3]
        p += l3
        late, c1, c2, c3 = _unpack_epilogue(mv, p)
        if late != LATE_STATUS_COMPLETE:
            return _aborted(late)
        if (_crc(seg1, 0) ^ MASK32 != c1 or _crc(seg2, 0) ^ MASK32 != c2
                or _crc(seg3, 0) ^ MASK32 != c3):
            raise _epilogue_error(tag)
        return Frame(tag, (seg0, seg1, seg2, seg3), flags)


def _aborted(late: int) -> Frame | None:
    """A non-COMPLETE late_status: ``None`` (skip the frame) for ABORTED, else raise."""
    if late == LATE_STATUS_ABORTED:
        # The sender gave up mid-frame; its segments are meaningless, crcs unchecked.
        return None
    # The high nibble is reserved; accepting it would let a corrupt byte through.
    raise FrameError(f"bad late_status {late:#04x} (want 0x0e complete or 0x01 aborted)",
                     "bad_late_status")


def _epilogue_error(tag: int) -> FrameError:
    # Absent segments must carry crc 0: a non-zero value there is corruption too.
    return FrameError(f"{tag_name(tag)} segment crc mismatch in epilogue: corrupt stream",
                      "bad_crc")
