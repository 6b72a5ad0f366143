"""Connections on their way to a worker: CONN deliveries awaiting their CONN_ACK, and the
relay of a draining worker's HANDOFF through them (supervisors.md 2.8).

The sender keeps its fd until the answer (Node's RoundRobinHandle): the worker got a
duplicate over SCM_RIGHTS, so a NAK or a dead target leaves the connection intact for
the next try.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pool.control.channel import Channel
from pool.control.messages import Conn, ConnAck, Handoff, HandoffResult

__all__ = ["Deliveries"]

Result = Callable[[bool], None]


class Deliveries:
    """``channel_of(slot, generation)`` is the running worker's channel (any generation
    when None) or None; ``accepting(slot)`` says whether it takes connections."""

    def __init__(self, channel_of: Callable[[int, int | None], Channel | None],
                 call_soon: Callable[[Callable[[], None]], None],
                 accepting: Callable[[int], bool], stats: dict[str, int]) -> None:
        self.channel_of = channel_of
        self.call_soon = call_soon
        self.accepting = accepting
        self.stats = stats
        self.next_xid = 1
        self.pending: dict[int, tuple[int, Result]] = {}

    def deliver(self, slot: int, fd: int, meta: bytes, on_result: Result) -> None:
        """Send ``fd`` (+ ``meta``) to ``slot``; ``on_result(adopted)`` later. The caller
        keeps ``fd`` open until then (the worker got a duplicate)."""
        ch = self.channel_of(slot, None)
        if ch is None or ch.closed:
            self.call_soon(lambda: on_result(False))
            return
        xid = self.next_xid
        self.next_xid += 1
        self.pending[xid] = (slot, on_result)
        ch.post(Conn([fd], xid, meta))

    def answered(self, msg: ConnAck) -> None:
        entry = self.pending.pop(msg.xid, None)
        if entry is not None:
            entry[1](msg.adopted)

    def fail(self, slot: int) -> None:
        """``slot``'s worker is gone: every delivery to it is a NAK."""
        for xid, (s, cb) in list(self.pending.items()):
            if s == slot:
                del self.pending[xid]
                cb(False)

    def relay(self, source: int, gen: int, msg: Handoff) -> None:
        """A draining worker hands a connection to ``msg.target``: forward it, report back."""

        def reply(ok: bool) -> None:
            ch = self.channel_of(source, gen)
            if ch is not None:
                ch.post(HandoffResult(msg.xid, ok))
            self.stats["relayed" if ok else "relay_failures"] += 1

        fd = msg.fd()
        if fd is None:
            reply(False)
            return
        target = msg.target
        if target == source or not self.accepting(target):
            os.close(fd)
            reply(False)
            return

        def done(ok: bool) -> None:
            os.close(fd)
            reply(ok)

        self.deliver(target, fd, msg.meta, done)
