"""msgr2.1 ("rev1", crc mode) banner and frame codec, sans-I/O.

Wire layout of one frame::

    preamble (32) | seg0 | le32 crc(seg0) if seg0 non-empty | seg1 | seg2 | seg3 | epilogue (13)

- preamble: u8 tag, u8 nseg, 4 x (le32 length, le16 alignment), u8 flags, u8 reserved,
  le32 raw crc32c (seed 0) of the first 28 bytes;
- segment crcs are raw crc32c with seed 0xFFFFFFFF;
- the epilogue exists only when nseg > 1: u8 late_status, 3 x le32 crc of seg1..3
  (0 for absent segments).

The decoder is BufferedProtocol-shaped: the transport asks ``get_buffer()`` for memory,
``recv_into``s it and reports ``buffer_updated(n)``; ``next_frame()`` then returns whole
frames whose segments are memoryviews into that very memory (zero copy). Every size cap
is checked from the preamble before any memory is allocated for a body.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import crc32c as _crc32c

from .errors import FrameError, LocalProtocolError, RemoteProtocolError

__all__ = [
    "BANNER_PREFIX",
    "BANNER_SIZE",
    "EPILOGUE_SIZE",
    "LATE_STATUS_ABORTED",
    "LATE_STATUS_COMPLETE",
    "PREAMBLE_SIZE",
    "Banner",
    "Frame",
    "FrameDecoder",
    "FrameLimits",
    "Tag",
    "encode_banner",
    "encode_frame",
    "frame_bytes",
    "tag_name",
]

Buffer = bytes | bytearray | memoryview


class Tag(enum.IntEnum):
    """Frame tags, numbered as in Ceph's ``frames_v2.h`` (and the Linux client)."""

    HELLO = 1
    AUTH_REQUEST = 2
    AUTH_BAD_METHOD = 3
    AUTH_REPLY_MORE = 4
    AUTH_REQUEST_MORE = 5
    AUTH_DONE = 6
    AUTH_SIGNATURE = 7
    CLIENT_IDENT = 8
    SERVER_IDENT = 9
    IDENT_MISSING_FEATURES = 10
    SESSION_RECONNECT = 11
    SESSION_RESET = 12
    SESSION_RETRY = 13
    SESSION_RETRY_GLOBAL = 14
    SESSION_RECONNECT_OK = 15
    WAIT = 16
    MESSAGE = 17
    KEEPALIVE2 = 18
    KEEPALIVE2_ACK = 19
    ACK = 20


BANNER_PREFIX = b"ceph v2\n"
_MSGR1_PREFIX = b"ceph v0"  # msgr1 banners are b"ceph v027"; they diverge from ours at byte 6
_BANNER_PAYLOAD = struct.Struct("<QQ")
_BANNER_LEN = struct.Struct("<H")
BANNER_SIZE = len(BANNER_PREFIX) + _BANNER_LEN.size + _BANNER_PAYLOAD.size  # 26

PREAMBLE_SIZE = 32
EPILOGUE_SIZE = 13
MAX_SEGMENTS = 4
LATE_STATUS_COMPLETE = 0x0E
LATE_STATUS_ABORTED = 0x01

_MASK32 = 0xFFFFFFFF
# The package computes the finalised CRC; inline the raw-seed conversions on the hot path
# instead of calling protocol.crc.crc32c (saves a Python call per check):
#   raw(seed=0)          == finalised(data, 0xFFFFFFFF) ^ 0xFFFFFFFF
#   raw(seed=0xFFFFFFFF) == finalised(data, 0) ^ 0xFFFFFFFF
_crc = _crc32c.crc32c

_PRE_BODY = struct.Struct("<BBIHIHIHIHBB")  # the 28 bytes the preamble crc covers
_PREAMBLE = struct.Struct("<BBIHIHIHIHBBI")
_EPILOGUE = struct.Struct("<BIII")
_U32 = struct.Struct("<I")
# Bound methods looked up once: the per-message fast path calls them for every frame.
_unpack_preamble = _PREAMBLE.unpack_from
_unpack_epilogue = _EPILOGUE.unpack_from
_unpack_u32 = _U32.unpack_from
assert _PREAMBLE.size == PREAMBLE_SIZE and _EPILOGUE.size == EPILOGUE_SIZE

_ALIGN_DEFAULT = 8
_ALIGN_DATA = 4096  # receive-buffer hint for the MESSAGE data segment (index 3)
_TAG_MESSAGE = int(Tag.MESSAGE)
_TAG_SET = frozenset(int(t) for t in Tag)
# A 256-entry table is cheaper than enum membership tests on every frame.
_KNOWN_TAG = tuple(t in _TAG_SET for t in range(256))

_CONTROL_MAX_CEILING = 64 * 1024
_SEGMENT_MAX_CEILING = 16 * 1024 * 1024
_DATA_MAX_CEILING = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """Hard caps enforced from the preamble, before the body is allocated.

    ``control_max`` bounds the (single) segment of any non-MESSAGE frame; for MESSAGE
    frames segment 3 (data) is bounded by ``data_max`` and header, front and middle by
    ``segment_max``. Values may be lowered, never raised above the defaults.
    """

    control_max: int = _CONTROL_MAX_CEILING
    segment_max: int = _SEGMENT_MAX_CEILING
    data_max: int = _DATA_MAX_CEILING

    def __post_init__(self) -> None:
        for name, ceiling in (("control_max", _CONTROL_MAX_CEILING),
                              ("segment_max", _SEGMENT_MAX_CEILING),
                              ("data_max", _DATA_MAX_CEILING)):
            value = getattr(self, name)
            if type(value) is not int or not 0 < value <= ceiling:
                raise LocalProtocolError(
                    f"FrameLimits.{name} must be an int in 1..{ceiling}, got {value!r}",
                    "bad_limits")


@dataclass(frozen=True, slots=True)
class Banner:
    """The peer's banner: its supported and required feature bits."""

    supported: int
    required: int


@dataclass(slots=True)
class Frame:
    """One decoded frame. ``segments`` are views into the decoder's receive memory."""

    tag: int
    segments: tuple[memoryview, ...]
    flags: int = 0


def encode_banner(supported: int, required: int) -> bytes:
    """``b"ceph v2\\n"`` + le16 payload length (16) + le64 supported + le64 required."""
    try:
        payload = _BANNER_PAYLOAD.pack(supported, required)
    except struct.error as exc:
        raise LocalProtocolError(f"banner feature bits must be u64: {exc}", "bad_banner") from exc
    return BANNER_PREFIX + _BANNER_LEN.pack(len(payload)) + payload


def _nbytes(seg: Buffer) -> int:
    # len() of a memoryview counts elements, not bytes; nbytes keeps a non-byte view
    # from making the preamble lie about what goes on the wire.
    return seg.nbytes if isinstance(seg, memoryview) else len(seg)


def encode_frame(tag: int, segments: Sequence[Buffer], flags: int = 0) -> list[Buffer]:
    """Buffers for a vectored send of one frame; the segments themselves are not copied.

    Returns ``[preamble, seg0, crc0, seg1, .., epilogue]`` where ``crc0`` is present only
    for a non-empty seg0, the epilogue only for more than one segment, and empty
    segments contribute no buffer (they carry no bytes). Trailing empty segments are
    trimmed; at least one segment always remains.
    """
    if tag not in _TAG_SET:
        raise LocalProtocolError(f"cannot encode unknown frame tag {tag!r}", "bad_tag")
    if flags and flags != flags & 0xFF:
        raise LocalProtocolError(f"frame flags must be a u8, got {flags!r}", "bad_flags")
    # Unrolled for the common 1..3 segment frames: this runs for every message sent.
    nseg = len(segments)
    lens = [_nbytes(seg) for seg in segments] if nseg > 3 else None
    if lens is None:
        lens = [0, 0, 0, 0]
        if nseg:
            lens[0] = _nbytes(segments[0])
            if nseg > 1:
                lens[1] = _nbytes(segments[1])
                if nseg > 2:
                    lens[2] = _nbytes(segments[2])
    while nseg > 1 and lens[nseg - 1] == 0:
        nseg -= 1
    if not 1 <= nseg <= MAX_SEGMENTS:
        raise LocalProtocolError(
            f"a frame carries 1..{MAX_SEGMENTS} segments, got {nseg}", "bad_segments")
    l0 = lens[0]
    if nseg == 1:
        body = _PRE_BODY.pack(tag, 1, l0, _ALIGN_DEFAULT, 0, 0, 0, 0, 0, 0, flags, 0)
    else:
        l1 = lens[1]
        l2 = lens[2] if nseg > 2 else 0
        l3 = lens[3] if nseg > 3 else 0
        a3 = (_ALIGN_DATA if tag == _TAG_MESSAGE else _ALIGN_DEFAULT) if nseg > 3 else 0
        body = _PRE_BODY.pack(tag, nseg, l0, _ALIGN_DEFAULT, l1, _ALIGN_DEFAULT, l2,
                              _ALIGN_DEFAULT if nseg > 2 else 0, l3, a3, flags, 0)
    out: list[Buffer] = [body + _U32.pack(_crc(body, _MASK32) ^ _MASK32)]
    if l0:
        seg0 = segments[0]
        out.append(seg0)
        out.append(_U32.pack(_crc(seg0, 0) ^ _MASK32))
    if nseg > 1:
        crcs = [0, 0, 0]
        for i in range(1, nseg):
            if lens[i]:
                seg = segments[i]
                crcs[i - 1] = _crc(seg, 0) ^ _MASK32
                out.append(seg)
            else:
                crcs[i - 1] = _MASK32  # raw crc32c(-1) of nothing is the seed itself
        out.append(_EPILOGUE.pack(LATE_STATUS_COMPLETE, crcs[0], crcs[1], crcs[2]))
    return out


def encode_message_frame(header: bytes, front: bytes, data: Buffer,
                         middle: Buffer = b"") -> list[Buffer]:
    """``encode_frame(Tag.MESSAGE, [header, front, middle, data])`` for the hot path.

    Same bytes as the general encoder (trailing empty segments trimmed), specialised as
    it runs once per message. Small frames come back as ONE buffer (joining ~100 bytes is
    cheaper than five tiny iovecs); a large data segment stays apart, never copied."""
    l0 = len(header)
    l1 = len(front)
    l3 = data.nbytes if type(data) is memoryview else len(data)
    crc = _crc
    if len(middle):  # rare (Ceph messages only): the general encoder
        return encode_frame(_TAG_MESSAGE, [header, front, middle, data])
    if l3:  # the middle present but empty (align 8, crc of nothing), as Ceph sends it
        body = _PRE_BODY.pack(_TAG_MESSAGE, 4, l0, 8, l1, 8, 0, 8, l3, _ALIGN_DATA, 0, 0)
        # crc32c of nothing (seed -1, inverted) is 0xffffffff: no call for an empty front
        epi = _EPILOGUE.pack(LATE_STATUS_COMPLETE, crc(front, 0) ^ _MASK32 if l1 else _MASK32,
                             _MASK32, crc(data, 0) ^ _MASK32)
        pre_crc = _U32.pack(crc(body, _MASK32) ^ _MASK32)
        head_crc = _U32.pack(crc(header, 0) ^ _MASK32)
        if l3 <= 4096:
            return [b"".join((body, pre_crc, header, head_crc, front, data, epi))]
        return [b"".join((body, pre_crc, header, head_crc, front)), data, epi]
    if l1:
        body = _PRE_BODY.pack(_TAG_MESSAGE, 2, l0, 8, l1, 8, 0, 0, 0, 0, 0, 0)
        return [b"".join((body, _U32.pack(crc(body, _MASK32) ^ _MASK32), header,
                          _U32.pack(crc(header, 0) ^ _MASK32), front,
                          _EPILOGUE.pack(LATE_STATUS_COMPLETE, crc(front, 0) ^ _MASK32,
                                         0, 0)))]
    body = _PRE_BODY.pack(_TAG_MESSAGE, 1, l0, 8, 0, 0, 0, 0, 0, 0, 0, 0)
    return [b"".join((body, _U32.pack(crc(body, _MASK32) ^ _MASK32), header,
                      _U32.pack(crc(header, 0) ^ _MASK32)))]


def frame_bytes(tag: int, segments: Sequence[Buffer], flags: int = 0) -> bytes:
    """The whole frame as one ``bytes`` (tests, small control frames)."""
    return b"".join(encode_frame(tag, segments, flags))


# Parsed preamble: (tag, nseg, len0, len1, len2, len3, flags, total on-wire size).
_Header = tuple[int, int, int, int, int, int, int, int]

_MIN_CHUNK = 64
#: the empty middle segment handed out by next_message (one object, not a slice per frame)
_EMPTY_VIEW = memoryview(b"")
# Below this much free tail a chunk is retired: a recv into a few bytes costs a
# syscall for almost nothing, while moving a small partial frame is cheap.
_MIN_TAIL = 2048


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
        self._buf = bytearray(chunk_size)
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
        buf = bytearray(size)
        n = len(leftover)
        buf[:n] = leftover
        self._buf = buf
        self._mv = memoryview(buf)
        self._start = 0
        self._end = n
        self._last_len = 0

    def _enter_big(self, hdr: _Header) -> None:
        """Give the (validated, size-capped) pending frame its own exact-size buffer."""
        big = bytearray(hdr[7])
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
            if head.startswith(_MSGR1_PREFIX):
                raise RemoteProtocolError(
                    "peer speaks msgr1 (banner 'ceph v027'); only msgr2 is supported: "
                    "enable ms_bind_msgr2 / use a v2 address on the peer", "msgr1")
            raise RemoteProtocolError(
                f"peer did not send a msgr2 banner (got {head[:k]!r}); not a Ceph msgr2 peer",
                "bad_banner")
        if avail < len(BANNER_PREFIX) + _BANNER_LEN.size:
            return None
        (plen,) = _BANNER_LEN.unpack_from(head, len(BANNER_PREFIX))
        if plen != _BANNER_PAYLOAD.size:
            raise RemoteProtocolError(
                f"banner payload length must be {_BANNER_PAYLOAD.size}, got {plen}", "bad_banner")
        if avail < BANNER_SIZE:
            return None
        supported, required = _BANNER_PAYLOAD.unpack_from(head, len(BANNER_PREFIX) + 2)
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

    def next_message(self) -> tuple[memoryview, ...] | None:
        """The segments of the next frame if it is a whole, valid MESSAGE frame of 1, 2 or
        4 segments (with an empty middle: what every sender without a middle sends) lying
        in the current chunk, consumed; else ``None`` and nothing consumed.

        The per-message fast path: one call instead of ``next_frame`` and its helpers,
        and no ``Frame`` object. It never raises and accepts only frames ``next_frame``
        accepts. On ``None`` the caller asks ``next_frame()``, which handles everything
        else (more bytes needed, control frames, big frames, aborted frames) and raises
        the precise error for a bad frame, so errors are worded in one place.
        """
        start = self._start
        if (self._hdr is not None or self._big is not None or self._may_banner
                or self._end - start < PREAMBLE_SIZE):
            return None
        buf = self._buf
        (tag, nseg, l0, _a0, l1, _a1, l2, _a2, l3, _a3, _flags, _rsv,
         crc) = _unpack_preamble(buf, start)
        if tag != _TAG_MESSAGE or l2 or not l0 or l0 > self._segment_max:
            return None
        if nseg == 1:
            if l1 or l3:
                return None
            end = start + PREAMBLE_SIZE + 4 + l0
        elif nseg == 2:
            if l3 or not l1 or l1 > self._segment_max:
                return None
            end = start + PREAMBLE_SIZE + 4 + l0 + l1 + EPILOGUE_SIZE
        elif nseg == 4:
            if not l3 or l1 > self._segment_max or l3 > self._data_max:
                return None
            end = start + PREAMBLE_SIZE + 4 + l0 + l1 + l3 + EPILOGUE_SIZE
        else:
            return None
        if end > self._end:
            return None
        mv = self._mv
        if _crc(mv[start:start + 28], _MASK32) ^ _MASK32 != crc:
            return None
        p = start + PREAMBLE_SIZE
        seg0 = mv[p:p + l0]
        p += l0
        if _crc(seg0, 0) ^ _MASK32 != _unpack_u32(buf, p)[0]:
            return None
        if nseg == 1:
            self._start = end
            return (seg0,)
        p += 4
        seg1 = mv[p:p + l1]
        if nseg == 2:
            late, c1, c2, c3 = _unpack_epilogue(buf, p + l1)
            if late != LATE_STATUS_COMPLETE or c2 or c3 or _crc(seg1, 0) ^ _MASK32 != c1:
                return None
            self._start = end
            return (seg0, seg1)
        p += l1
        seg3 = mv[p:p + l3]
        late, c1, c2, c3 = _unpack_epilogue(buf, p + l3)
        if (late != LATE_STATUS_COMPLETE or c2 != _MASK32
                or (_crc(seg1, 0) ^ _MASK32 if l1 else _MASK32) != c1  # empty: ~0, no call
                or _crc(seg3, 0) ^ _MASK32 != c3):
            return None
        self._start = end
        return (seg0, seg1, _EMPTY_VIEW, seg3)

    def _parse_preamble(self, off: int) -> _Header:
        """Validate the preamble at ``off`` and return its header; allocates nothing."""
        (tag, nseg, l0, _a0, l1, _a1, l2, _a2, l3, _a3, flags, _rsv,
         crc) = _PREAMBLE.unpack_from(self._buf, off)
        got = _crc(self._mv[off:off + 28], _MASK32) ^ _MASK32
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
        if not _KNOWN_TAG[tag]:
            raise FrameError(f"unknown frame tag {tag}", "bad_tag")
        if tag == _TAG_MESSAGE:
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
            (want,) = _U32.unpack_from(mv, p)
            p += 4
            if _crc(seg0, 0) ^ _MASK32 != want:
                raise FrameError(f"{tag_name(tag)} segment 0 crc mismatch: corrupt stream",
                                 "bad_crc")
        if nseg == 1:
            return Frame(tag, (seg0,), flags)
        # Unrolled per segment count: only present segments are sliced and crc'd.
        seg1 = mv[p:p + l1]
        p += l1
        if nseg == 2:
            late, c1, c2, c3 = _EPILOGUE.unpack_from(mv, p)
            if late != LATE_STATUS_COMPLETE:
                return _aborted(late)
            if _crc(seg1, 0) ^ _MASK32 != c1 or c2 or c3:
                raise _epilogue_error(tag)
            return Frame(tag, (seg0, seg1), flags)
        seg2 = mv[p:p + l2]
        p += l2
        if nseg == 3:
            late, c1, c2, c3 = _EPILOGUE.unpack_from(mv, p)
            if late != LATE_STATUS_COMPLETE:
                return _aborted(late)
            if (_crc(seg1, 0) ^ _MASK32 != c1 or _crc(seg2, 0) ^ _MASK32 != c2 or c3):
                raise _epilogue_error(tag)
            return Frame(tag, (seg0, seg1, seg2), flags)
        seg3 = mv[p:p + l3]
        p += l3
        late, c1, c2, c3 = _EPILOGUE.unpack_from(mv, p)
        if late != LATE_STATUS_COMPLETE:
            return _aborted(late)
        if (_crc(seg1, 0) ^ _MASK32 != c1 or _crc(seg2, 0) ^ _MASK32 != c2
                or _crc(seg3, 0) ^ _MASK32 != c3):
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


def tag_name(tag: int) -> str:
    """The tag's name for error messages, or its number when it is not a known tag."""
    return Tag(tag).name if tag in _TAG_SET else str(tag)
