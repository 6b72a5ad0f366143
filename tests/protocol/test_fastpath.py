"""The hot-path MESSAGE encoder must produce exactly the general encoder's bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.frames import FrameDecoder, Tag, encode_frame, encode_message_frame
from protocol.message import HEADER


@settings(max_examples=300, deadline=None)
@given(front=st.binary(max_size=300), data=st.binary(max_size=9000),
       seq=st.integers(0, 2**64 - 1), as_view=st.booleans())
def test_fused_encoder_matches_general(front: bytes, data: bytes, seq: int, as_view: bool) -> None:
    header = HEADER.pack(7, 127, 0, seq, 3, 9, 0)
    payload = memoryview(data) if as_view else data
    fast = b"".join(bytes(b) for b in encode_message_frame(header, front, payload))
    general = b"".join(bytes(b) for b in encode_frame(Tag.MESSAGE, [header, front, data]))
    assert fast == general
    dec = FrameDecoder()
    dec.feed(fast)
    frame = dec.next_frame()
    assert frame is not None and frame.tag == Tag.MESSAGE
    assert bytes(frame.segments[0]) == header


def test_large_data_is_not_copied() -> None:
    data = bytearray(100_000)
    bufs = encode_message_frame(HEADER.pack(1, 127, 0, 1, 0, 0, 0), b"\x90", data)
    assert any(b is data for b in bufs)
