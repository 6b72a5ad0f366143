"""The per-slot worker lifecycle: one transition table, plus the restart policy.

Pure: no processes, no clocks (``now`` is passed in), no randomness except through an
injected :class:`random.Random`. The supervisor feeds events; the table alone decides
the next state, so every legal path is visible in :data:`TRANSITIONS`::

    EXITED ──spawn──▶ SPAWNING ──ready──▶ READY ──accepting──▶ ACCEPTING
    SPAWNING | READY | ACCEPTING ──drain──▶ DRAINING ──drained──▶ QUIESCED
    DRAINING | QUIESCED | STOPPING ──exited──▶ EXITED
    any live state ──stop──▶ STOPPING                 (BACKOFF ──stop──▶ EXITED)
    any live state ──heartbeat_timeout──▶ STALLED     (then SIGABRT, SIGKILL)
    SPAWNING | READY | ACCEPTING | STALLED ──died──▶ BACKOFF ──spawn──▶ SPAWNING
    SPAWNING | READY | ACCEPTING | STALLED ──gave_up──▶ FAILED
    BACKOFF | FAILED ──retire──▶ EXITED

States beyond the issue's five, and why:

* ``BACKOFF``: the slot is empty but a replacement is scheduled; it must count as
  "wanted" so reconcile does not spawn a second worker for it (supervisors.md 2.5).
* ``STALLED``: the heartbeat deadline passed and the kill sequence (SIGABRT, then
  SIGKILL) is under way; the Processor must not route to it (supervisors.md 2.4).
* ``STOPPING``: pool shutdown; its exit is expected, unlike a crash, and is not
  replaced (DRAINING is the scale-down path with connection migration).
* ``QUIESCED``: a retiring worker that migrated everything and is exiting
  (supervisors.md 2.10); the slot is still not free until SIGCHLD.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass, field

from pool.control.states import State

__all__ = [
    "LIVE_STATES",
    "TRANSITIONS",
    "Backoff",
    "Event",
    "FlapGuard",
    "IllegalTransition",
    "State",
    "WorkerSlot",
]


class Event(enum.Enum):
    SPAWN = "spawn"
    READY = "ready"
    ACCEPTING = "accepting"
    DRAIN = "drain"
    STOP = "stop"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    DRAINED = "drained"  # the retiring worker reports it owns nothing
    EXITED = "exited"  # an expected exit (after DRAIN or STOP)
    DIED = "died"  # an unexpected exit: restart after a back-off
    GAVE_UP = "gave_up"  # an unexpected exit past the flap window
    RETIRE = "retire"  # an empty slot is no longer wanted


S, E = State, Event
#: The one place transitions live: (state, event) -> next state.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.EXITED, E.SPAWN): S.SPAWNING,
    (S.BACKOFF, E.SPAWN): S.SPAWNING,
    (S.SPAWNING, E.READY): S.READY,
    (S.READY, E.ACCEPTING): S.ACCEPTING,
    # Scale-down may pick a slot that is still booting; it has nothing to migrate.
    (S.SPAWNING, E.DRAIN): S.DRAINING,
    (S.READY, E.DRAIN): S.DRAINING,
    (S.ACCEPTING, E.DRAIN): S.DRAINING,
    **{(s, E.STOP): S.STOPPING
       for s in (S.SPAWNING, S.READY, S.ACCEPTING, S.DRAINING, S.QUIESCED, S.STALLED)},
    **{(s, E.HEARTBEAT_TIMEOUT): S.STALLED
       for s in (S.SPAWNING, S.READY, S.ACCEPTING, S.DRAINING, S.QUIESCED)},
    (S.DRAINING, E.DRAINED): S.QUIESCED,
    (S.DRAINING, E.EXITED): S.EXITED,
    (S.QUIESCED, E.EXITED): S.EXITED,
    (S.STOPPING, E.EXITED): S.EXITED,
    **{(s, E.DIED): S.BACKOFF for s in (S.SPAWNING, S.READY, S.ACCEPTING, S.STALLED)},
    **{(s, E.GAVE_UP): S.FAILED for s in (S.SPAWNING, S.READY, S.ACCEPTING, S.STALLED)},
    # A retiring worker that stalls was going away anyway: its death ends the slot.
    (S.STALLED, E.EXITED): S.EXITED,
    (S.BACKOFF, E.RETIRE): S.EXITED,
    (S.FAILED, E.RETIRE): S.EXITED,
    (S.BACKOFF, E.STOP): S.EXITED,
}
del S, E

#: States in which a process exists (or is about to) and counts toward the desired count.
LIVE_STATES = frozenset({State.SPAWNING, State.READY, State.ACCEPTING, State.STALLED, State.BACKOFF})


class IllegalTransition(RuntimeError):
    """An event that the table does not allow in the current state (a supervisor bug)."""

    def __init__(self, slot: int, state: State, event: Event) -> None:
        super().__init__(f"slot {slot}: event {event.value!r} is not allowed in state {state.name}")
        self.slot, self.state, self.event = slot, state, event


@dataclass(frozen=True)
class Backoff:
    """Capped exponential back-off with jitter: ``min(cap, base * factor**n)`` scaled by
    a random factor in ``[1 - jitter, 1]`` (so simultaneous crashes do not restart in
    lock-step, and the cap really is the maximum)."""

    base: float = 0.1
    factor: float = 2.0
    cap: float = 5.0
    jitter: float = 0.5

    def delay(self, attempt: int, rng: random.Random) -> float:
        raw = min(self.cap, self.base * self.factor ** max(0, attempt))
        return raw * (1.0 - self.jitter * rng.random())


@dataclass
class FlapGuard:
    """Deaths before READY inside a sliding window; more than ``max_deaths`` trips it."""

    window: float = 10.0
    max_deaths: int = 3
    _deaths: deque[float] = field(default_factory=deque)

    def record(self, now: float) -> bool:
        """Record one boot failure at ``now``; True once the window is exceeded."""
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - self.window:
            self._deaths.popleft()
        return len(self._deaths) >= self.max_deaths

    @property
    def count(self) -> int:
        return len(self._deaths)


@dataclass
class WorkerSlot:
    """One slot of the pool: its state, its current process and its restart history.

    ``fire`` is the only way to change ``state``. ``exited`` turns a process exit into
    the right event (expected exit, restart, or give up) and returns the back-off delay
    before the next spawn (None when no restart is due).
    """

    slot: int
    backoff: Backoff = field(default_factory=Backoff)
    flap: FlapGuard = field(default_factory=FlapGuard)
    state: State = State.EXITED
    pid: int = 0
    restarts: int = 0
    generation: int = 0
    #: consecutive crashes since the last worker that stayed up ``stable_after`` seconds
    crash_streak: int = 0
    stable_after: float = 10.0
    spawned_at: float = 0.0
    ready_at: float | None = None
    restart_at: float | None = None
    last_exit: int | None = None
    #: set by DRAIN: a later stall and death ends the slot instead of restarting it
    retiring: bool = False
    history: list[tuple[State, Event, State]] = field(default_factory=list)

    def can(self, event: Event) -> bool:
        return (self.state, event) in TRANSITIONS

    def fire(self, event: Event) -> State:
        """Apply ``event``; raises :class:`IllegalTransition` when the table forbids it."""
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise IllegalTransition(self.slot, self.state, event)
        if event is Event.DRAIN:
            self.retiring = True
        elif event is Event.SPAWN:
            self.retiring = False
        self.history.append((self.state, event, new))
        del self.history[:-32]  # bounded: only the recent past helps a bug report
        self.state = new
        return new

    def spawned(self, pid: int, now: float) -> None:
        self.fire(Event.SPAWN)
        self.pid = pid
        self.generation += 1
        self.spawned_at = now
        self.ready_at = None
        self.restart_at = None

    def ready(self, now: float) -> None:
        self.fire(Event.READY)
        self.ready_at = now

    def exited(self, code: int, now: float, rng: random.Random) -> float | None:
        """The process is gone (``code`` as in ``waitstatus_to_exitcode``).

        Returns the delay before a replacement should be spawned, or None.
        """
        self.last_exit = code
        self.pid = 0
        if self.state in (State.DRAINING, State.QUIESCED, State.STOPPING) or (
                self.state is State.STALLED and self.retiring):
            self.fire(Event.EXITED)
            return None
        before_ready = self.ready_at is None
        if before_ready and self.flap.record(now):
            self.fire(Event.GAVE_UP)
            return None
        if self.ready_at is not None and now - self.ready_at >= self.stable_after:
            self.crash_streak = 0  # it ran long enough: start the back-off over
        delay = self.backoff.delay(self.crash_streak, rng)
        self.crash_streak += 1
        self.restarts += 1
        self.fire(Event.DIED)
        self.restart_at = now + delay
        return delay
