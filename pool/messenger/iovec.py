"""Shaping the buffers a connection hands to ``sendmsg``."""

from __future__ import annotations

from transport.stack import Buffer

__all__ = ["COALESCE_BELOW", "Outbox", "coalesce"]

#: buffers below this size are joined before sendmsg: copying a few hundred bytes is
#: cheaper than one iovec each (measured: 630 small iovecs cost 2x one joined buffer);
#: larger payloads stay separate iovecs and are never copied.
COALESCE_BELOW = 16 * 1024


def coalesce(bufs: list[Buffer]) -> list[Buffer]:
    """``bufs`` with each run of small buffers joined into one, order kept."""
    out: list[Buffer] = []
    run: list[Buffer] = []
    for b in bufs:
        if len(b) < COALESCE_BELOW:
            run.append(b)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else b"".join(run))
            run = []
        out.append(b)
    if run:
        out.append(run[0] if len(run) == 1 else b"".join(run))
    return out


class Outbox:
    """What a connection handed to its socket's ``send`` but the socket has not taken
    yet, in order, with its size (the send-side backpressure reads ``nbytes``)."""

    __slots__ = ("bufs", "nbytes")

    def __init__(self) -> None:
        self.bufs: list[Buffer] = []
        self.nbytes = 0

    def add(self, new: list[Buffer]) -> None:
        for b in new:
            self.nbytes += len(b)
        self.bufs.extend(coalesce(new) if len(new) > 1 else new)

    def consume(self, n: int) -> None:
        """The socket took ``n`` bytes from the front (``bufs`` is trimmed in place)."""
        out = self.bufs
        self.nbytes -= n
        i = 0
        while n and i < len(out):
            ln = len(out[i])
            if n >= ln:
                n -= ln
                i += 1
            else:
                out[i] = memoryview(out[i])[n:]
                n = 0
        del out[:i]

    def clear(self) -> None:
        self.bufs.clear()
        self.nbytes = 0
