"""Shared-memory transport: SPSC record rings, eventfd doorbells, segments.

The ring is correct on x86-64 (TSO) only and refuses to start elsewhere; see
:mod:`transport.shm.ring` for the memory-ordering argument.
"""

from .doorbell import Doorbell
from .ring import EXACT_WAKEUP, Ring, RingConsumer, RingPoller, RingProducer
from .segment import Segment

__all__ = ["EXACT_WAKEUP", "Doorbell", "Ring", "RingConsumer", "RingPoller", "RingProducer", "Segment"]
