"""Encoding msgr2.1 banners and frames (the layout is in :mod:`protocol.frames`).

Buffers come back ready for a vectored send; segments themselves are never copied except
where joining a small frame into one buffer is cheaper than several iovecs.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from crc32c import crc32c as _crc

from .accel import ACCEL
from .errors import LocalProtocolError
from .frame_format import (
    ALIGN_DATA, ALIGN_DEFAULT, BANNER_LEN, BANNER_PAYLOAD, BANNER_PREFIX, EPILOGUE,
    LATE_STATUS_COMPLETE, MASK32, MAX_SEGMENTS, PRE_BODY, TAG_MESSAGE, TAG_SET, U32, Buffer,
)

__all__ = ["encode_banner", "encode_frame", "encode_message_frame",
           "encode_message_frame_python", "frame_bytes"]

# Bound methods as module globals, assigned rather than imported: CPython 3.11 compiles
# ``imported_name.method(...)`` as an attribute load that builds a bound method on every
# call (it takes imported names for modules), ~15 % more work per message frame.
_pack_pre_body = PRE_BODY.pack
_pack_u32 = U32.pack
_pack_epilogue = EPILOGUE.pack
if ACCEL is not None:
    _encode = ACCEL.encode_message_frame  # the compiled frame builder


def encode_banner(supported: int, required: int) -> bytes:
    """``b"ceph v2\\n"`` + le16 payload length (16) + le64 supported + le64 required."""
    try:
        payload = BANNER_PAYLOAD.pack(supported, required)
    except struct.error as exc:
        raise LocalProtocolError(f"banner feature bits must be u64: {exc}", "bad_banner") from exc
    return BANNER_PREFIX + BANNER_LEN.pack(len(payload)) + payload


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
    if tag not in TAG_SET:
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
        body = _pack_pre_body(tag, 1, l0, ALIGN_DEFAULT, 0, 0, 0, 0, 0, 0, flags, 0)
    else:
        l1 = lens[1]
        l2 = lens[2] if nseg > 2 else 0
        l3 = lens[3] if nseg > 3 else 0
        a3 = (ALIGN_DATA if tag == TAG_MESSAGE else ALIGN_DEFAULT) if nseg > 3 else 0
        body = _pack_pre_body(tag, nseg, l0, ALIGN_DEFAULT, l1, ALIGN_DEFAULT, l2,
                              ALIGN_DEFAULT if nseg > 2 else 0, l3, a3, flags, 0)
    out: list[Buffer] = [body + _pack_u32(_crc(body, MASK32) ^ MASK32)]
    if l0:
        seg0 = segments[0]
        out.append(seg0)
        out.append(_pack_u32(_crc(seg0, 0) ^ MASK32))
    if nseg > 1:
        crcs = [0, 0, 0]
        for i in range(1, nseg):
            if lens[i]:
                seg = segments[i]
                crcs[i - 1] = _crc(seg, 0) ^ MASK32
                out.append(seg)
            else:
                crcs[i - 1] = MASK32  # raw crc32c(-1) of nothing is the seed itself
        out.append(_pack_epilogue(LATE_STATUS_COMPLETE, crcs[0], crcs[1], crcs[2]))
    return out


def encode_message_frame_python(header: bytes, front: bytes, data: Buffer,
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
        return encode_frame(TAG_MESSAGE, [header, front, middle, data])
    if l3:  # the middle present but empty (align 8, crc of nothing), as Ceph sends it
        body = _pack_pre_body(TAG_MESSAGE, 4, l0, 8, l1, 8, 0, 8, l3, ALIGN_DATA, 0, 0)
        # crc32c of nothing (seed -1, inverted) is 0xffffffff: no call for an empty front
        epi = _pack_epilogue(LATE_STATUS_COMPLETE, crc(front, 0) ^ MASK32 if l1 else MASK32,
                             MASK32, crc(data, 0) ^ MASK32)
        pre_crc = _pack_u32(crc(body, MASK32) ^ MASK32)
        head_crc = _pack_u32(crc(header, 0) ^ MASK32)
        if l3 <= 4096:
            return [b"".join((body, pre_crc, header, head_crc, front, data, epi))]
        return [b"".join((body, pre_crc, header, head_crc, front)), data, epi]
    if l1:
        body = _pack_pre_body(TAG_MESSAGE, 2, l0, 8, l1, 8, 0, 0, 0, 0, 0, 0)
        return [b"".join((body, _pack_u32(crc(body, MASK32) ^ MASK32), header,
                          _pack_u32(crc(header, 0) ^ MASK32), front,
                          _pack_epilogue(LATE_STATUS_COMPLETE, crc(front, 0) ^ MASK32,
                                         0, 0)))]
    body = _pack_pre_body(TAG_MESSAGE, 1, l0, 8, 0, 0, 0, 0, 0, 0, 0, 0)
    return [b"".join((body, _pack_u32(crc(body, MASK32) ^ MASK32), header,
                      _pack_u32(crc(header, 0) ^ MASK32)))]


if ACCEL is None:
    encode_message_frame = encode_message_frame_python
else:
    def encode_message_frame(header: bytes, front: bytes, data: Buffer,
                             middle: Buffer = b"") -> list[Buffer]:
        """:func:`encode_message_frame_python`, compiled (protocol._accel): the same
        buffers, byte for byte; a frame with a middle segment takes the general encoder."""
        if len(middle):
            return encode_frame(TAG_MESSAGE, [header, front, middle, data])
        frame: list[Buffer] = _encode(header, front, data)
        return frame


def frame_bytes(tag: int, segments: Sequence[Buffer], flags: int = 0) -> bytes:
    """The whole frame as one ``bytes`` (tests, small control frames)."""
    return b"".join(encode_frame(tag, segments, flags))
