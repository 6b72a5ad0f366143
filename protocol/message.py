"""Messages carried by MESSAGE frames: Ceph's ``ceph_msg_header2`` and four segments.

Segments of a MESSAGE frame (msgr2.1): ``[header (41 bytes), front, middle, data]``,
data at index 3 with alignment 4096; trailing empty segments are trimmed.

Two families share the frame:

- **Ceph messages** (``raw=True``): ``type`` is Ceph's type number; ``front`` and
  ``middle`` are bytes in the type's own encoding (:mod:`protocol.ceph.messages` has the
  ones asyncmsgr knows), ``version``/``compat_version`` come from the header. Anything a
  Ceph peer sends arrives this way; any type may be sent this way.
- **asyncmsgr messages** (``raw=False``, the default): ``front`` is any msgpack-able
  object and ``type`` is the application's number in ``0..ASYNCMSGR_TYPE_MAX``; on the
  wire the type is ``ASYNCMSGR_TYPE_BASE + type``. They travel only between peers that
  announced asyncmsgr in their banner (``features.ASYNCMSGR``): a real Ceph daemon
  closes the connection on a type it does not know, so sending one to a Ceph peer is a
  ``LocalProtocolError`` raised before anything is written.

The data segment is never decoded or re-encoded, and on receive it is the frame's
memoryview itself, so a large payload is never copied by this layer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import msgpack

from .buffer import Buffer
from .ceph.header import HEADER2
from .errors import LocalProtocolError, RemoteProtocolError
from .accel import ACCEL
from .frame_decoder import scan_message_python
from .frame_encoder import encode_message_frame

__all__ = [
    "ASYNCMSGR_TYPE_BASE",
    "ASYNCMSGR_TYPE_MAX",
    "HEADER",
    "MAX_FRONT",
    "PRIO_DEFAULT",
    "PRIO_HIGH",
    "PRIO_HIGHEST",
    "PRIO_LOW",
    "Message",
    "check_outgoing",
    "check_outgoing_python",
    "decode_message",
    "decode_messages",
    "decode_messages_python",
    "encode_header",
    "encode_messages",
    "encode_messages_python",
    "message_segments",
    "refuse_ceph_peer",
]

PRIO_LOW = 64
PRIO_DEFAULT = 127
PRIO_HIGH = 196
PRIO_HIGHEST = 255

#: ceph_msg_header2 (41 bytes): seq, tid, type, priority, version, data_pre_padding_len,
#: data_off, ack_seq, flags, compat_version, reserved
HEADER = HEADER2
MAX_FRONT = 16 * 1024 * 1024
#: asyncmsgr's message family: wire types BASE..BASE+MAX (Ceph's types stay far below)
ASYNCMSGR_TYPE_BASE = 0x8000
ASYNCMSGR_TYPE_MAX = 0x7FFF

_EMPTY = b""
_packb = msgpack.packb
_unpackb = msgpack.unpackb
#: the compiled header + frame builder, or None on the pure-Python path
_encode_message = None if ACCEL is None else ACCEL.encode_message
_encode_batch = None if ACCEL is None else ACCEL.encode_batch
_pack_header = HEADER2.pack
_unpack_header = HEADER2.unpack
_HEADER_SIZE = HEADER2.size
# Everything msgpack raises for malformed input: truncated/extra data and bad formats
# (ValueError family), unhashable map keys (TypeError), absurd nesting (StackError is a
# ValueError; RecursionError for safety), and ints out of range for Python-side hooks.
_MSGPACK_ERRORS = (ValueError, TypeError, RecursionError, OverflowError,
                   msgpack.exceptions.UnpackException)


@dataclass(slots=True, eq=False)
class Message:
    """One message. Equality is identity: two sends are two messages."""

    type: int
    front: Any = None
    data: Buffer = b""
    priority: int = PRIO_DEFAULT
    tid: int = 0
    flags: int = 0
    seq: int = 0  # set by the session on send / from the header on receive
    ack_seq: int = 0
    #: a Ceph message: ``front``/``middle`` are raw bytes, ``type`` is Ceph's number
    raw: bool = False
    middle: Buffer = b""
    version: int = 1
    compat_version: int = 1
    _front: bytes | None = field(default=None, init=False, repr=False)

    def encoded_front(self) -> bytes:
        """The front segment, cached so a resend after reconnect does not re-encode.

        asyncmsgr messages: ``msgpack.packb(front)``, with ``None`` as the empty segment;
        mutating ``front`` after the first send is not seen by later resends (by design:
        a resend must carry the same bytes). Ceph messages: ``front`` itself (bytes).
        """
        cached = self._front
        if cached is None:
            front = self.front
            if self.raw:
                if front is None:
                    cached = _EMPTY
                elif isinstance(front, bytes | bytearray | memoryview):
                    cached = bytes(front)
                else:
                    raise LocalProtocolError(
                        f"Ceph message type {self.type}: front must be bytes (encode it with "
                        f"protocol.ceph.messages), got {type(front).__name__}", "bad_front")
            elif front is None:
                cached = _EMPTY
            else:
                try:
                    cached = _packb(front, use_bin_type=True)
                except (TypeError, ValueError, OverflowError) as exc:
                    raise LocalProtocolError(
                        f"message type {self.type}: front is not msgpack-able ({exc})",
                        "bad_front") from exc
            self._front = cached
        return cached

    @property
    def wire_type(self) -> int:
        return self.type if self.raw else ASYNCMSGR_TYPE_BASE + self.type


def _pack(msg: Message, seq: int, ack_seq: int) -> bytes:
    """The one ceph_msg_header2 packer (the compiled frame builder is its twin): validates
    every field the caller sets, so a bad one is named instead of a bare struct.error."""
    t = msg.type
    if not msg.raw:
        if type(t) is not int or not 0 <= t <= ASYNCMSGR_TYPE_MAX:
            raise LocalProtocolError(
                f"asyncmsgr message type must be 0..{ASYNCMSGR_TYPE_MAX}, got {t!r} (for a "
                "Ceph type number, send a Ceph message: Message(..., raw=True))", "bad_header")
        t += ASYNCMSGR_TYPE_BASE
    try:
        return _pack_header(seq, msg.tid, t, msg.priority, msg.version, 0, 0,
                            ack_seq, msg.flags, msg.compat_version, 0)
    except struct.error as exc:
        raise LocalProtocolError(
            f"message header out of range (type u16, priority u16, version u16, tid u64, "
            f"flags u8, compat_version u16): {exc}", "bad_header") from exc


def encode_header(msg: Message) -> bytes:
    """The header segment for a message the session has numbered (``msg.seq``)."""
    return _pack(msg, msg.seq, msg.ack_seq)


def check_outgoing_python(msg: Message, ceph_peer: bool = False) -> None:
    """Raise ``LocalProtocolError`` now if ``msg`` cannot be encoded (header fields out of
    range, a front that is not msgpack-able or, for a Ceph message, not bytes), or if it
    is an asyncmsgr message and the peer is known to be a Ceph daemon. Call it when the
    message is queued, so the sender hears of its mistake instead of the session failing
    later, after the message took a sequence number. The front encoding is cached.

    :data:`check_outgoing` is this, or its compiled twin (``protocol._accel``), which
    passes a message it can vouch for at once and hands every other one to this
    function, so errors are worded here alone."""
    if ceph_peer and not msg.raw:
        refuse_ceph_peer(msg)
    _pack(msg, 0, 0)  # packing is the range check (seq/ack are the session's)
    msg.encoded_front()


def refuse_ceph_peer(msg: Message) -> NoReturn:
    raise LocalProtocolError(
        f"message type {msg.type} is an asyncmsgr message (msgpack front) and the peer is a "
        "Ceph daemon, which closes the connection on types it does not know: send Ceph "
        "messages to it (protocol.ceph.messages, Message(..., raw=True))", "ceph_peer")


def encode_messages(batch: list[Message], asyncmsgr_peer: bool, out: list[Buffer],
                    seal: Callable[[list[Buffer]], bytes] | None = None) -> None:
    """Append the MESSAGE frames of a numbered batch to ``out`` (each frame sealed into
    one record by ``seal`` in secure mode). An asyncmsgr message for a peer that did not
    announce asyncmsgr is a ``LocalProtocolError`` before its frame is built.

    Compiled, without ``seal``: ``protocol._accel.encode_batch`` encodes the batch into
    one joined buffer (the same bytes), leaving to :func:`encode_messages_python` only a
    message it cannot take (a middle segment, a field to word an error about)."""
    if _encode_batch is None or seal is not None:
        encode_messages_python(batch, asyncmsgr_peer, out, seal)
        return
    i, n = 0, len(batch)
    while True:
        i = _encode_batch(batch, i, asyncmsgr_peer, out)
        if i >= n:
            return
        encode_messages_python(batch[i:i + 1], asyncmsgr_peer, out)
        i += 1


def encode_messages_python(batch: Sequence[Message], asyncmsgr_peer: bool, out: list[Buffer],
                           seal: Callable[[list[Buffer]], bytes] | None = None) -> None:
    """:func:`encode_messages`, one message at a time (the pure-Python reference; with the
    extension, each frame is still built by its compiled ``encode_message``)."""
    enc = _encode_message
    base = ASYNCMSGR_TYPE_BASE
    for msg in batch:
        raw = msg.raw
        if not raw and not asyncmsgr_peer:
            refuse_ceph_peer(msg)
        if enc is not None and not len(msg.middle):
            try:  # header and frame in one compiled call (it range-checks every field)
                t = msg.type if raw else msg.type + base
                if t < base and not raw:
                    raise OverflowError  # a negative asyncmsgr type
                frame = enc(msg.seq, msg.tid, t, msg.priority, msg.version, msg.ack_seq,
                            msg.flags, msg.compat_version, msg.encoded_front(), msg.data)
            except (OverflowError, TypeError):
                _pack(msg, msg.seq, msg.ack_seq)  # raises, naming the field
                raise
        else:
            frame = encode_message_frame(_pack(msg, msg.seq, msg.ack_seq), msg.encoded_front(),
                                         msg.data, msg.middle)
        if seal is None:
            out += frame
        else:
            out.append(seal(frame))


def message_segments(msg: Message, seq: int, ack_seq: int) -> list[Buffer]:
    """Segments for ``encode_frame(Tag.MESSAGE, ...)``: header, front, middle, data,
    trimmed after the last non-empty one. ``msg`` itself is not modified."""
    segs: list[Buffer] = [_pack(msg, seq, ack_seq), msg.encoded_front(), msg.middle, msg.data]
    while len(segs) > 1 and not len(segs[-1]):
        segs.pop()
    return segs


def decode_message(segments: Sequence[memoryview], max_front: int = MAX_FRONT,
                   asyncmsgr: bool = True) -> Message:
    """Rebuild a ``Message`` from a MESSAGE frame's segments (1 to 4 of them).

    ``asyncmsgr``: the peer announced asyncmsgr, so types of its family carry msgpack
    fronts; every other message is a Ceph message (``raw``, front and middle as bytes).
    The data segment is returned as the given memoryview itself (no copy).
    """
    n = len(segments)
    if not 1 <= n <= 4:
        raise RemoteProtocolError(f"MESSAGE frame has {n} segments, expected 1..4 "
                                  "(header, front, middle, data)", "bad_segments")
    head = segments[0]
    if len(head) != _HEADER_SIZE:
        raise RemoteProtocolError(f"MESSAGE header is {len(head)} bytes, ceph_msg_header2 is "
                                  f"{_HEADER_SIZE}", "bad_header")
    (seq, tid, wtype, prio, version, pad, _off, ack_seq, flags, compat,
     _rsv) = _unpack_header(head)
    if pad:
        raise RemoteProtocolError(f"MESSAGE header data_pre_padding_len is {pad}, must be 0",
                                  "bad_header")
    raw_front = segments[1] if n > 1 else _EMPTY
    size = len(raw_front)
    if size > max_front:
        raise RemoteProtocolError(f"MESSAGE front is {size} bytes, cap {max_front}", "oversize")
    # (an empty middle is what every sender without one sends: no bytes() call for it)
    middle: Buffer = bytes(segments[2]) if n > 2 and segments[2].nbytes else _EMPTY
    data: Buffer = segments[3] if n > 3 else _EMPTY
    if not asyncmsgr or wtype < ASYNCMSGR_TYPE_BASE:
        return Message(wtype, bytes(raw_front), data, prio, tid, flags, seq, ack_seq, True,
                       middle, version, compat)
    front: Any = None
    if size:
        # Every container/string limit is bounded by the segment length, so a tiny
        # front cannot announce a huge array and make msgpack preallocate it.
        try:
            front = _unpackb(raw_front, raw=False, strict_map_key=False, use_list=True,
                             max_str_len=size, max_bin_len=size, max_array_len=size,
                             max_map_len=size, max_ext_len=size)
        except _MSGPACK_ERRORS as exc:
            raise RemoteProtocolError(
                f"MESSAGE type {wtype - ASYNCMSGR_TYPE_BASE} front is not one valid msgpack "
                f"object: {exc}", "bad_msgpack") from exc
    return Message(wtype - ASYNCMSGR_TYPE_BASE, front, data, prio, tid, flags, seq, ack_seq,
                   False, middle, version, compat)


def decode_messages_python(mv: memoryview, start: int, end: int, segment_max: int,
                           data_max: int, max_front: int, asyncmsgr: bool, limit: int
                           ) -> tuple[list[Message], list[int], int]:
    """Up to ``limit`` consecutive whole MESSAGE frames of ``mv[start:end]``, decoded:
    ``(messages, ends, max_ack)``, ``ends[i]`` the offset just after ``messages[i]``,
    ``max_ack`` the highest ``ack_seq`` among them (0 for none). Nothing is consumed; it
    stops at the first frame the fast scan or :func:`decode_message` would not take,
    which the general decoder then handles (and words the error of). The receive batch
    of issue 16; ``protocol._accel.decode_messages`` is its compiled twin."""
    msgs: list[Message] = []
    ends: list[int] = []
    max_ack = 0
    while len(msgs) < limit:
        r = scan_message_python(mv, start, end, segment_max, data_max)
        if r is None:
            break
        try:
            msg = decode_message(r[1], max_front, asyncmsgr)
        except RemoteProtocolError:
            break
        start = r[0]
        msgs.append(msg)
        ends.append(start)
        if msg.ack_seq > max_ack:
            max_ack = msg.ack_seq
    return msgs, ends, max_ack


if ACCEL is None:
    decode_messages = decode_messages_python
    check_outgoing = check_outgoing_python
else:
    # What the compiled batch builds and calls: the same class and the same unpackb, so
    # both paths make the same objects and refuse the same fronts.
    ACCEL.setup_decode(Message, _unpackb, _MSGPACK_ERRORS)
    ACCEL.setup_encode(_packb, check_outgoing_python)
    decode_messages = ACCEL.decode_messages
    check_outgoing = ACCEL.check_outgoing
