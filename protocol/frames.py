"""msgr2.1 ("rev1", crc mode) banner and frame codec, sans-I/O.

Wire layout of one frame::

    preamble (32) | seg0 | le32 crc(seg0) if seg0 non-empty | seg1 | seg2 | seg3 | epilogue (13)

- preamble: u8 tag, u8 nseg, 4 x (le32 length, le16 alignment), u8 flags, u8 reserved,
  le32 raw crc32c (seed 0) of the first 28 bytes;
- segment crcs are raw crc32c with seed 0xFFFFFFFF;
- the epilogue exists only when nseg > 1: u8 late_status, 3 x le32 crc of seg1..3
  (0 for absent segments).

The code lives in three modules, re-exported here: :mod:`protocol.frame_format` (tags,
sizes, limits), :mod:`protocol.frame_encoder` and :mod:`protocol.frame_decoder`.
The decoder is BufferedProtocol-shaped: the transport asks ``get_buffer()`` for memory,
``recv_into``s it and reports ``buffer_updated(n)``; ``next_frame()`` then returns whole
frames whose segments are memoryviews into that very memory (zero copy). Every size cap
is checked from the preamble before any memory is allocated for a body.
"""

from __future__ import annotations

from .frame_decoder import FrameDecoder
from .frame_encoder import encode_banner, encode_frame, encode_message_frame, frame_bytes
from .frame_format import (
    BANNER_PREFIX, BANNER_SIZE, EPILOGUE_SIZE, LATE_STATUS_ABORTED, LATE_STATUS_COMPLETE,
    MAX_SEGMENTS, PREAMBLE_SIZE, Banner, Buffer, Frame, FrameLimits, Tag, tag_name,
)

__all__ = [
    "BANNER_PREFIX",
    "BANNER_SIZE",
    "EPILOGUE_SIZE",
    "LATE_STATUS_ABORTED",
    "LATE_STATUS_COMPLETE",
    "MAX_SEGMENTS",
    "PREAMBLE_SIZE",
    "Banner",
    "Buffer",
    "Frame",
    "FrameDecoder",
    "FrameLimits",
    "Tag",
    "encode_banner",
    "encode_frame",
    "encode_message_frame",
    "frame_bytes",
    "tag_name",
]
