"""Application messages carried by MESSAGE frames: header, msgpack front, raw data.

Segments of a MESSAGE frame: ``[header (32 bytes), front (msgpack), data (raw)]``.
An empty front segment means ``front=None`` (saves a segment and its crc for the common
header-only message); the data segment is never decoded or re-encoded, and on receive it
is the frame's memoryview itself, so a large payload is never copied by this layer.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "HEADER",
    "MAX_FRONT",
    "PRIO_DEFAULT",
    "PRIO_HIGH",
    "PRIO_HIGHEST",
    "PRIO_LOW",
    "Message",
    "check_outgoing",
    "decode_message",
    "message_segments",
]

PRIO_LOW = 64
PRIO_DEFAULT = 127
PRIO_HIGH = 196
PRIO_HIGHEST = 255

#: type u16, priority u8, reserved u8, seq u64, ack_seq u64, tid u64, flags u32 (32 bytes).
HEADER = struct.Struct("<HBBQQQI")
MAX_FRONT = 16 * 1024 * 1024

Data = bytes | bytearray | memoryview
_EMPTY = b""
_packb = msgpack.packb
_unpackb = msgpack.unpackb
# Everything msgpack raises for malformed input: truncated/extra data and bad formats
# (ValueError family), unhashable map keys (TypeError), absurd nesting (StackError is a
# ValueError; RecursionError for safety), and ints out of range for Python-side hooks.
_MSGPACK_ERRORS = (ValueError, TypeError, RecursionError, OverflowError,
                   msgpack.exceptions.UnpackException)


@dataclass(slots=True, eq=False)
class Message:
    """One application message. Equality is identity: two sends are two messages."""

    type: int
    front: Any = None
    data: Data = b""
    priority: int = PRIO_DEFAULT
    tid: int = 0
    flags: int = 0
    seq: int = 0  # set by the session on send / from the header on receive
    ack_seq: int = 0
    _front: bytes | None = field(default=None, init=False, repr=False)

    def encoded_front(self) -> bytes:
        """``msgpack.packb(front)``, cached so a resend after reconnect does not re-encode.

        ``None`` encodes as the empty segment. Mutating ``front`` after the first send is
        not seen by later resends (by design: a resend must carry the same bytes).
        """
        cached = self._front
        if cached is None:
            if self.front is None:
                cached = _EMPTY
            else:
                try:
                    cached = _packb(self.front, use_bin_type=True)
                except (TypeError, ValueError, OverflowError) as exc:
                    raise LocalProtocolError(
                        f"message type {self.type}: front is not msgpack-able ({exc})",
                        "bad_front") from exc
            self._front = cached
        return cached


def check_outgoing(msg: Message) -> None:
    """Raise ``LocalProtocolError`` now if ``msg`` cannot be encoded: its header fields
    out of range or its front not msgpack-able. Call it when the message is queued, so
    the sender hears of its mistake instead of the session failing later, after the
    message took a sequence number. The front encoding is cached for the send."""
    try:
        HEADER.pack(msg.type, msg.priority, 0, 0, 0, msg.tid, msg.flags)
    except struct.error as exc:
        raise LocalProtocolError(
            f"message header out of range (type u16, priority u8, tid u64, flags u32): {exc}",
            "bad_header") from exc
    msg.encoded_front()


def message_segments(msg: Message, seq: int, ack_seq: int) -> list[Data]:
    """Segments for ``encode_frame(Tag.MESSAGE, ...)``: header, front, and data if any.

    ``seq``/``ack_seq`` go into the header; ``msg`` itself is not modified (the session
    owns ``msg.seq``).
    """
    try:
        header = HEADER.pack(msg.type, msg.priority, 0, seq, ack_seq, msg.tid, msg.flags)
    except struct.error as exc:
        raise LocalProtocolError(
            f"message header out of range (type u16, priority u8, seq/ack/tid u64, flags u32):"
            f" {exc}", "bad_header") from exc
    data = msg.data
    if len(data):
        return [header, msg.encoded_front(), data]
    return [header, msg.encoded_front()]


def decode_message(segments: Sequence[memoryview], max_front: int = MAX_FRONT) -> Message:
    """Rebuild a ``Message`` from a MESSAGE frame's segments (1 to 3 of them).

    The data segment is returned as the given memoryview itself (no copy).
    """
    n = len(segments)
    if not 1 <= n <= 3:
        raise RemoteProtocolError(f"MESSAGE frame has {n} segments, expected 1..3 "
                                  "(header, front, data)", "bad_segments")
    head = segments[0]
    if len(head) != HEADER.size:
        raise RemoteProtocolError(f"MESSAGE header is {len(head)} bytes, must be {HEADER.size}",
                                  "bad_header")
    mtype, prio, reserved, seq, ack_seq, tid, flags = HEADER.unpack(head)
    if reserved:
        raise RemoteProtocolError(f"MESSAGE header reserved byte is {reserved}, must be 0",
                                  "bad_header")
    front: Any = None
    if n > 1:
        raw = segments[1]
        size = len(raw)
        if size > max_front:
            raise RemoteProtocolError(f"MESSAGE front is {size} bytes, cap {max_front}",
                                      "oversize")
        if size:
            # Every container/string limit is bounded by the segment length, so a tiny
            # front cannot announce a huge array and make msgpack preallocate it.
            try:
                front = _unpackb(raw, raw=False, strict_map_key=False, use_list=True,
                                 max_str_len=size, max_bin_len=size, max_array_len=size,
                                 max_map_len=size, max_ext_len=size)
            except _MSGPACK_ERRORS as exc:
                raise RemoteProtocolError(
                    f"MESSAGE type {mtype} front is not one valid msgpack object: {exc}",
                    "bad_msgpack") from exc
    data: Data = segments[2] if n > 2 else _EMPTY
    return Message(mtype, front, data, prio, tid, flags, seq, ack_seq)
