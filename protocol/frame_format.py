"""The msgr2.1 ("rev1", crc mode) wire layout: frame tags, sizes, limits, and the structs
the encoder (:mod:`protocol.frame_encoder`) and decoder (:mod:`protocol.frame_decoder`)
share. :mod:`protocol.frames` describes one frame on the wire and re-exports all three.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .buffer import Buffer
from .errors import LocalProtocolError

__all__ = [
    "ALIGN_DATA", "ALIGN_DEFAULT", "BANNER_LEN", "BANNER_PAYLOAD", "BANNER_PREFIX",
    "BANNER_SIZE", "EPILOGUE", "EPILOGUE_SIZE", "KNOWN_TAG", "LATE_STATUS_ABORTED",
    "LATE_STATUS_COMPLETE", "MASK32", "MAX_SEGMENTS", "MSGR1_PREFIX", "PREAMBLE",
    "PREAMBLE_SIZE", "PRE_BODY", "TAG_MESSAGE", "TAG_SET", "U32", "Banner", "Buffer", "Frame",
    "FrameLimits", "Tag", "tag_name",
]

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
MSGR1_PREFIX = b"ceph v0"  # msgr1 banners are b"ceph v027"; they diverge from ours at byte 6
BANNER_PAYLOAD = struct.Struct("<QQ")
BANNER_LEN = struct.Struct("<H")
BANNER_SIZE = len(BANNER_PREFIX) + BANNER_LEN.size + BANNER_PAYLOAD.size  # 26

PREAMBLE_SIZE = 32
EPILOGUE_SIZE = 13
MAX_SEGMENTS = 4
LATE_STATUS_COMPLETE = 0x0E
LATE_STATUS_ABORTED = 0x01

#: The crc32c package computes the finalised CRC; the codecs inline the raw-seed
#: conversions on the hot path instead of calling protocol.crc.crc32c (a Python call
#: per check saved):
#:   raw(seed=0)          == finalised(data, 0xFFFFFFFF) ^ 0xFFFFFFFF
#:   raw(seed=0xFFFFFFFF) == finalised(data, 0) ^ 0xFFFFFFFF
MASK32 = 0xFFFFFFFF

PRE_BODY = struct.Struct("<BBIHIHIHIHBB")  # the 28 bytes the preamble crc covers
PREAMBLE = struct.Struct("<BBIHIHIHIHBBI")
EPILOGUE = struct.Struct("<BIII")
U32 = struct.Struct("<I")
assert PREAMBLE.size == PREAMBLE_SIZE and EPILOGUE.size == EPILOGUE_SIZE

ALIGN_DEFAULT = 8
ALIGN_DATA = 4096  # receive-buffer hint for the MESSAGE data segment (index 3)
TAG_MESSAGE = int(Tag.MESSAGE)
TAG_SET = frozenset(int(t) for t in Tag)
# A 256-entry table is cheaper than enum membership tests on every frame.
KNOWN_TAG = tuple(t in TAG_SET for t in range(256))

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


def tag_name(tag: int) -> str:
    """The tag's name for error messages, or its number when it is not a known tag."""
    return Tag(tag).name if tag in TAG_SET else str(tag)
