"""The states of a worker slot, as the control page publishes them.

The supervisor's lifecycle table (:mod:`pool.supervisor.lifecycle`) decides them; a
worker only reads them (which peers accept), so the enum lives here, with the page,
and the worker never imports the supervisor.
"""

from __future__ import annotations

import enum

__all__ = ["State"]


class State(enum.IntEnum):
    """Slot states; the integer values are what the control page stores."""

    EXITED = 0  # no process; also the initial state of a never-used slot
    SPAWNING = 1  # process started, READY not yet received
    READY = 2  # READY received, not yet told to accept
    ACCEPTING = 3  # takes new connections
    DRAINING = 4  # retiring: migrating its connections away
    STOPPING = 5  # pool shutdown: SIGTERM sent
    STALLED = 6  # missed its heartbeat deadline: being killed
    BACKOFF = 7  # died; a replacement is scheduled
    FAILED = 8  # flap guard tripped: no more restarts
    QUIESCED = 9  # retiring, owns nothing any more (DRAINED received), exiting
