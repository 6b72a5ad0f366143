"""Shared-memory transport: SPSC record rings, eventfd doorbells, segments.

The ring is correct on x86-64 (TSO) only and refuses to start elsewhere; see
:mod:`transport.shm.ring` for the memory-ordering argument. Modules: :mod:`.ring` (the
layout and the shared header), :mod:`.endpoints` (producer and consumer, the hot path),
:mod:`.poller` (an EventCenter driving a consumer), :mod:`.membarrier`,
:mod:`.doorbell`, :mod:`.segment`.
"""

from .doorbell import Doorbell
from .endpoints import RingConsumer, RingProducer
from .membarrier import EXACT_WAKEUP
from .poller import RingPoller
from .ring import Ring
from .segment import Segment

__all__ = ["EXACT_WAKEUP", "Doorbell", "Ring", "RingConsumer", "RingPoller", "RingProducer", "Segment"]
