"""Types of the compiled per-message frame path (protocol/_accel.c)."""

from collections.abc import Callable
from typing import Any

Buffer = bytes | bytearray | memoryview

CRC_IMPL: str

def crc32c(data: Buffer, seed: int, /) -> int: ...
def scan_message(mv: memoryview, start: int, end: int, segment_max: int, data_max: int,
                 /) -> tuple[int, tuple[memoryview, ...]] | None: ...
def decode_messages(mv: memoryview, start: int, end: int, segment_max: int, data_max: int,
                    max_front: int, asyncmsgr: bool, limit: int,
                    /) -> tuple[list[Any], list[int], int]: ...
def setup_decode(message_class: Callable[..., Any], unpackb: Callable[..., Any],
                 errors: tuple[type[BaseException], ...], /) -> None: ...
def encode_message_frame(header: Buffer, front: Buffer, data: Buffer, /) -> list[Buffer]: ...
def encode_message(seq: int, tid: int, type: int, priority: int, version: int, ack_seq: int,
                   flags: int, compat: int, front: Buffer, data: Buffer, /) -> list[Buffer]: ...
