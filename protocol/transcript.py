"""The pre-auth transcript that AUTH_SIGNATURE signs (msgr2: ``pre_auth`` buffers).

Each side keeps every raw byte it *received* and every raw byte it *sent* from its banner
until auth ends, whole frames included (preamble, segments, crcs, epilogue). It then
sends HMAC-SHA256(session key, received) and checks the peer's signature against
HMAC(session key, sent): any byte altered in transit makes the two disagree.

"Until auth ends" is exact even though a read may carry bytes past the last auth frame:
received bytes are logged as they arrive, and :meth:`Transcript.finish_received` cuts the
log at the number of bytes the frame decoder has consumed when auth ends, and stops
logging what arrives after (the sent side is kept until the peer's signature is checked).
With auth none there is no key and the signature is 32 zero bytes, so nothing is kept.
"""

from __future__ import annotations

from collections.abc import Iterable

from .buffer import Buffer

__all__ = ["Transcript"]


class Transcript:
    """Raw bytes in both directions while ``recording``; bounded by the caller's frame
    caps (only the handful of handshake frames before auth ends are ever logged)."""

    __slots__ = ("_rx", "_rx_on", "_tx", "recording")

    def __init__(self, recording: bool) -> None:
        self.recording = recording
        self._rx_on = recording
        self._rx = bytearray()
        self._tx = bytearray()

    def sent(self, bufs: Iterable[Buffer]) -> None:
        if self.recording:
            for b in bufs:
                self._tx += b

    def received(self, data: Buffer) -> None:
        if self._rx_on:
            self._rx += data

    def finish_received(self, unconsumed: int) -> bytes:
        """Auth ended: the received log minus its last ``unconsumed`` bytes (those not yet
        parsed as frames arrived after the frame that ended auth); logging stops."""
        end = len(self._rx) - unconsumed
        out = bytes(self._rx[:max(end, 0)])
        self._rx_on = False
        self._rx = bytearray()
        return out

    def sent_bytes(self) -> bytes:
        return bytes(self._tx)

    def stop(self) -> None:
        self.recording = self._rx_on = False
        self._rx = bytearray()
        self._tx = bytearray()
