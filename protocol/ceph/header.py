"""``ceph_msg_header2``: the 41-byte first segment of every msgr2 MESSAGE frame.

Packed little-endian, in this order (``notes/msgr2-wire.md``, "MESSAGE")::

    le64 seq, le64 tid, le16 type, le16 priority, le16 version,
    le32 data_pre_padding_len (0), le16 data_off, le64 ack_seq, u8 flags,
    le16 compat_version, le16 reserved

There is no footer in msgr2: the frame epilogue's crcs replace it. A mon sends flags 3.
"""

from __future__ import annotations

import struct

from ..errors import RemoteProtocolError
from .encoding import Buffer

__all__ = [
    "DATA_ALIGN",
    "DATA_SEGMENT",
    "HEADER2",
    "HEADER2_SIZE",
    "MSG_SEGMENTS",
    "decode_header2",
]

HEADER2 = struct.Struct("<QQHHHIHQBHH")
HEADER2_SIZE = HEADER2.size
assert HEADER2_SIZE == 41
#: header, front, middle, data
MSG_SEGMENTS = 4
DATA_SEGMENT = 3
DATA_ALIGN = 4096

#: (seq, tid, type, priority, version, data_pre_padding_len, data_off, ack_seq, flags,
#:  compat_version, reserved)
Header2 = tuple[int, int, int, int, int, int, int, int, int, int, int]


def decode_header2(seg: Buffer) -> Header2:
    """Unpack and validate a header segment (exact size; padding must be 0)."""
    n = seg.nbytes if isinstance(seg, memoryview) else len(seg)
    if n != HEADER2_SIZE:
        raise RemoteProtocolError(f"MESSAGE header is {n} bytes, ceph_msg_header2 is "
                                  f"{HEADER2_SIZE}", "bad_header")
    h: Header2 = HEADER2.unpack(seg)
    if h[5]:
        raise RemoteProtocolError(f"MESSAGE header data_pre_padding_len is {h[5]}, must be 0",
                                  "bad_header")
    return h
