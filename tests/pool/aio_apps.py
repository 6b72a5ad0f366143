"""Async handler apps for the pool tests (``--app tests.pool.aio_apps:NAME``)."""

from __future__ import annotations

import asyncio
import os

from pool.api import Message


async def upstream(msg: Message) -> Message | None:
    """Ask the line server at ``$MSGR_TEST_UPSTREAM`` (a port on 127.0.0.1) over a real
    asyncio socket and reply with what it said. Front ``"boom"`` raises; ``"quiet"``: no reply."""
    if msg.front == "boom":
        raise RuntimeError("test: handler failure")
    if msg.front == "quiet":
        return None
    reader, writer = await asyncio.open_connection("127.0.0.1",
                                                   int(os.environ["MSGR_TEST_UPSTREAM"]))
    try:
        writer.write(f"{msg.front}\n".encode())
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()
    return Message(msg.type, line.decode().rstrip("\n"))
