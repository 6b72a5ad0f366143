"""Types of the compiled per-message frame path (protocol/_accel.c)."""

Buffer = bytes | bytearray | memoryview

CRC_IMPL: str

def crc32c(data: Buffer, seed: int, /) -> int: ...
def scan_message(mv: memoryview, start: int, end: int, segment_max: int, data_max: int,
                 /) -> tuple[int, tuple[memoryview, ...]] | None: ...
def encode_message_frame(header: Buffer, front: Buffer, data: Buffer, /) -> list[Buffer]: ...
