"""A worker's end of the ring mesh: ``submit_to`` routing over it.

**Routing (worker side, :class:`Router`).** A record is ``<B kind><Q rid>`` + payload.
``submit(slot, payload, on_reply)`` sends a REQ on the ``me -> slot`` ring; the peer's
app answers through a reply callback and the REP/ERR record comes back on the reverse
ring. Like Seastar's smp service groups, at most ``inflight_limit`` requests per
destination are on the wire; the rest wait in a bounded local queue, beyond which the
request fails at once (:class:`Overloaded`). A full ring never drops and never blocks:
records wait in a per-peer backlog that the space doorbell flushes. Every request gets
exactly one ``on_reply`` call, always on a later loop iteration: bytes, or an exception
(:class:`PeerLost`, :class:`PeerUnavailable`, :class:`Overloaded`, :class:`RemoteError`).

Consumers are driven from the EventCenter: with ``spins > 0`` by a
:class:`~transport.shm.RingPoller` (spin, then block on the doorbell); with ``spins == 0``
(the default below 8 cores, see :class:`pool.worker.config.WorkerConfig`) by the doorbell
fd alone — drain until empty, announce sleep (flag + fence + re-check), let the producer's eventfd write wake us.

The rings themselves are made by the supervisor (:mod:`pool.supervisor.ring_mesh`).
"""

from __future__ import annotations

import functools
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transport.errors import BrokenResourceError
from transport.event_center import READABLE, EventCenter
from transport.shm import (
    Doorbell,
    Ring,
    RingConsumer,
    RingPoller,
    RingProducer,
    Segment,
)

from .app import (
    Overloaded,
    PeerLost,
    PeerUnavailable,
    RemoteError,
    ReplyCallback,
    SubmitError,
)

__all__ = ["Overloaded", "PeerLost", "PeerUnavailable", "RemoteError", "Router", "SubmitError"]

_HDR = struct.Struct("<BQ")
_REQ, _REP, _ERR = 1, 2, 3

@dataclass
class _End:
    seg: Segment
    ring: Ring
    bell: Doorbell
    space: Doorbell


@dataclass
class _Peer:
    slot: int
    out: _End | None = None
    inb: _End | None = None
    prod: RingProducer | None = None
    cons: RingConsumer | None = None
    poller: RingPoller | None = None
    bell_fd: int | None = None  # spins == 0: the doorbell alone drives the consumer
    space_fd: int | None = None
    next_rid: int = 1
    pending: dict[int, ReplyCallback] = field(default_factory=dict)
    queue: deque[tuple[int, bytes, ReplyCallback]] = field(default_factory=deque)
    backlog: deque[bytes] = field(default_factory=deque)

    @property
    def ready(self) -> bool:
        return self.prod is not None and self.cons is not None


class Router:
    """A worker's end of the mesh: attaches rings, sends requests, serves the peer's.

    ``on_request(src_slot, payload, reply)`` is the app's handler; ``reply`` takes bytes
    or an exception, exactly once, now or later.
    """

    def __init__(self, center: EventCenter, slot: int,
                 on_request: Callable[[int, bytes, ReplyCallback], None],
                 log: Callable[[str], None], inflight_limit: int = 256,
                 queue_limit: int = 8192, spins: int = 64, reply_spin: float = 0.0) -> None:
        self.center = center
        self.slot = slot
        self.on_request = on_request
        self.log = log
        self.inflight_limit = inflight_limit
        self.queue_limit = queue_limit
        self.spins = spins
        self.reply_spin = reply_spin
        self._spin_until = 0.0
        self._spinning = False
        self.peers: dict[int, _Peer] = {}
        self.stats = {"sent": 0, "served": 0, "replies": 0, "failed": 0, "backlogged": 0}

    # -- mesh changes ----------------------------------------------------------------------

    def add_ring(self, desc: dict[str, Any], fds: list[int]) -> None:
        """RING_ADD: attach one ring; we own ``fds`` (memfd, bell, space) from now on."""
        src, dst = int(desc["src"]), int(desc["dst"])
        if len(fds) < 3:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"RING_ADD {src}->{dst} came with {len(fds)} fds, 3 expected")
        bell, space = Doorbell.from_fd(fds[1]), Doorbell.from_fd(fds[2])
        for extra in fds[3:]:
            os.close(extra)
        if self.slot not in (src, dst) or src == dst:
            os.close(fds[0])
            bell.close()
            space.close()
            return
        seg = Segment.from_memfd(fds[0], int(desc["size"]))
        ring = Ring.attach(seg.buf)
        end = _End(seg, ring, bell, space)
        peer_slot = dst if src == self.slot else src
        peer = self.peers.get(peer_slot)
        if peer is None:
            peer = self.peers[peer_slot] = _Peer(peer_slot)
        if src == self.slot:
            if peer.out is not None:
                self._close_out(peer)
            peer.out = end
            peer.prod = RingProducer(ring, bell, space)
            peer.prod.on_space(functools.partial(self._flush, peer))
            peer.space_fd = space.fileno()
            self.center.create_file_event(peer.space_fd, READABLE,
                                          functools.partial(self._on_space_fd, peer))
        else:
            if peer.inb is not None:
                self._close_in(peer)
            peer.inb = end
            peer.cons = RingConsumer(ring, bell, space)
            if self.spins > 0:
                peer.poller = RingPoller(self.center, peer.cons,
                                         functools.partial(self._on_records, peer),
                                         functools.partial(self._on_broken, peer), spins=self.spins)
            else:
                # No spinning at all (few cores, see WorkerConfig.spins_for): no EventCenter poller,
                # so an idle worker blocks in epoll; the doorbell wakes it.
                peer.bell_fd = bell.fileno()
                self.center.create_file_event(peer.bell_fd, READABLE,
                                              functools.partial(self._on_bell, peer))
                self._drive(peer)

    def drop_peer(self, slot: int, retire: bool) -> None:
        """RING_DEL: ``slot`` exited. After a drain its last records are consumed first;
        whatever is still in flight to it then fails with :class:`PeerLost`."""
        peer = self.peers.pop(slot, None)
        if peer is None:
            return
        if retire and peer.cons is not None:
            try:
                while True:
                    views = peer.cons.drain()
                    if not views:
                        break
                    try:
                        self._on_records(peer, views)
                    finally:
                        peer.cons.release()
            except BrokenResourceError:
                pass
        self._fail_all(peer, PeerLost(f"worker {slot} {'retired' if retire else 'crashed'} "
                                      "with this request in flight"))
        self._close_out(peer)
        self._close_in(peer)

    def close(self) -> None:
        for slot in list(self.peers):
            self.drop_peer(slot, retire=False)

    def _close_out(self, peer: _Peer) -> None:
        if peer.space_fd is not None:
            self.center.delete_file_event(peer.space_fd, READABLE)
            peer.space_fd = None
        if peer.prod is not None:
            peer.prod.close()
            peer.prod = None
        if peer.out is not None:
            _close_end(peer.out)
            peer.out = None
        peer.backlog.clear()

    def _close_in(self, peer: _Peer) -> None:
        if peer.poller is not None:
            peer.poller.close()
            peer.poller = None
        if peer.bell_fd is not None:
            self.center.delete_file_event(peer.bell_fd, READABLE)
            peer.bell_fd = None
        if peer.cons is not None:
            peer.cons.close()
            peer.cons = None
        if peer.inb is not None:
            _close_end(peer.inb)
            peer.inb = None

    def _fail_all(self, peer: _Peer, exc: Exception) -> None:
        cbs = list(peer.pending.values()) + [cb for _rid, _rec, cb in peer.queue]
        peer.pending.clear()
        peer.queue.clear()
        self.stats["failed"] += len(cbs)
        for cb in cbs:
            self.center.call_soon(functools.partial(cb, exc))

    def _on_broken(self, peer: _Peer, exc: BrokenResourceError) -> None:
        # The supervisor reset the ring (the peer crashed); RING_DEL follows, but fail
        # now: nothing sent to that incarnation will ever be answered.
        if self.peers.get(peer.slot) is peer:
            self.log(f"ring with worker {peer.slot} was reset ({exc}): failing its requests")
            self.drop_peer(peer.slot, retire=False)

    # -- requests out ------------------------------------------------------------------------

    def submit(self, slot: int, payload: bytes, on_reply: ReplyCallback) -> None:
        peer = self.peers.get(slot)
        if peer is None or not peer.ready:
            exc: Exception = PeerUnavailable(f"no ring to worker {slot}")
            self.center.call_soon(lambda: on_reply(exc))
            return
        assert peer.prod is not None
        if _HDR.size + len(payload) > peer.out.ring.max_record:  # type: ignore[union-attr]
            exc = ValueError(f"request of {len(payload)} bytes exceeds the ring's record limit")
            self.center.call_soon(lambda: on_reply(exc))
            return
        rid = peer.next_rid
        peer.next_rid += 1
        if len(peer.pending) >= self.inflight_limit or peer.queue:
            if len(peer.queue) >= self.queue_limit:
                exc = Overloaded(f"worker {slot}: {len(peer.pending)} in flight and "
                                 f"{len(peer.queue)} queued")
                self.stats["failed"] += 1
                self.center.call_soon(lambda: on_reply(exc))
                return
            peer.queue.append((rid, payload, on_reply))
            return
        peer.pending[rid] = on_reply
        self._send(peer, _REQ, rid, payload)
        if self.reply_spin > 0.0:
            self._start_spin()

    # -- reply spin ----------------------------------------------------------------------
    # A request's reply usually comes back within tens of µs, while waking this process
    # from epoll on another CPU costs ~50 µs (ipc-facts.md). So right after a submit the
    # loop polls the rings for ``reply_spin`` seconds (call_soon keeps the EventCenter
    # from blocking) before it lets the doorbells wake it. Bounded, so an idle worker
    # never spins for long; the peer's doorbell still fires if we were not looking.

    def _start_spin(self) -> None:
        self._spin_until = time.monotonic() + self.reply_spin
        if not self._spinning:
            self._spinning = True
            self.center.call_soon(self._spin)

    def _spin(self) -> None:
        for peer in list(self.peers.values()):
            cons = peer.cons
            if cons is None or not peer.pending or not cons.pending():
                continue
            try:
                views = cons.drain()
                try:
                    self._on_records(peer, views)
                finally:
                    cons.release()
            except BrokenResourceError as exc:
                self._on_broken(peer, exc)
        if time.monotonic() < self._spin_until and any(p.pending for p in self.peers.values()):
            self.center.call_soon(self._spin)
        else:
            self._spinning = False

    def _pump(self, peer: _Peer) -> None:
        while peer.queue and len(peer.pending) < self.inflight_limit:
            rid, payload, cb = peer.queue.popleft()
            peer.pending[rid] = cb
            self._send(peer, _REQ, rid, payload)

    def _send(self, peer: _Peer, kind: int, rid: int, payload: bytes) -> None:
        """Write one record: header and payload straight into a reserved ring slot (the
        payload's only copy), or into the backlog while the ring is full."""
        prod = peer.prod
        if prod is None:
            return  # closed meanwhile: the callbacks were failed by drop_peer
        self.stats["sent"] += 1
        if peer.backlog:
            # keep order behind what already waits for space
            peer.backlog.append(_HDR.pack(kind, rid) + payload)
            return
        n = _HDR.size + len(payload)
        try:
            view = prod.try_reserve(n)
            if view is None:
                self.stats["backlogged"] += 1
                peer.backlog.append(_HDR.pack(kind, rid) + payload)
                return
            _HDR.pack_into(view, 0, kind, rid)
            view[_HDR.size:] = payload
            prod.commit(n)
            prod.publish()
        except BrokenResourceError as exc:
            self._on_broken(peer, exc)

    def _on_space_fd(self, peer: _Peer, _fd: int) -> None:
        self._on_space_event(peer)

    def _on_space_event(self, peer: _Peer) -> None:
        if peer.prod is not None:
            peer.prod.handle_space_event()
        self._flush(peer)

    def _flush(self, peer: _Peer) -> None:
        prod = peer.prod
        if prod is None or not peer.backlog:
            return
        try:
            n = prod.send_many(list(peer.backlog))
        except BrokenResourceError as exc:
            self._on_broken(peer, exc)
            return
        for _ in range(n):
            peer.backlog.popleft()

    # -- records in --------------------------------------------------------------------------

    def _on_bell(self, peer: _Peer, _fd: int) -> None:
        if peer.cons is not None:
            peer.cons.wake()  # clear "sleeping", reset the eventfd
            self._drive(peer)

    def _drive(self, peer: _Peer, batches: int = 16) -> None:
        """Drain ``peer``'s ring until it is empty *and* the consumer announced it sleeps
        (set flag, fence, re-check: the producer then rings the doorbell). After
        ``batches`` batches yield to the loop and continue on the next iteration."""
        cons = peer.cons
        try:
            for _ in range(batches):
                if cons is None or peer.cons is not cons:
                    return  # dropped meanwhile
                views = cons.drain()
                if views:
                    try:
                        self._on_records(peer, views)
                    finally:
                        if peer.cons is cons:
                            cons.release()
                    continue
                if cons.prepare_sleep():
                    return
            self.center.call_soon(functools.partial(self._drive, peer))
        except BrokenResourceError as exc:
            self._on_broken(peer, exc)

    def _on_records(self, peer: _Peer, views: list[memoryview]) -> None:
        unpack = _HDR.unpack_from
        for v in views:
            kind, rid = unpack(v)
            payload = bytes(v[_HDR.size:])  # the view dies at release
            if kind == _REQ:
                self._serve(peer, rid, payload)
            else:
                cb = peer.pending.pop(rid, None)
                if cb is None:
                    continue
                self.stats["replies"] += 1
                try:
                    cb(payload if kind == _REP else RemoteError(payload.decode("utf-8", "replace")))
                except Exception as exc:  # noqa: BLE001 - a callback must not kill the loop
                    self.log(f"submit_to reply callback raised: {exc!r}")
        self._pump(peer)

    def _serve(self, peer: _Peer, rid: int, payload: bytes) -> None:
        self.stats["served"] += 1
        done = False

        def reply(result: bytes | Exception) -> None:
            nonlocal done
            if done:
                return
            done = True
            if self.peers.get(peer.slot) is not peer:
                return  # the requester is gone: nobody to answer
            if isinstance(result, Exception):
                self._send(peer, _ERR, rid, str(result).encode()[:4096])
            else:
                self._send(peer, _REP, rid, result)

        try:
            self.on_request(peer.slot, payload, reply)
        except Exception as exc:  # noqa: BLE001 - answer, never leave the requester hanging
            reply(RemoteError(f"handler raised {exc!r}"))


def _close_end(end: _End) -> None:
    end.ring.close()
    end.seg.close()
    end.bell.close()
    end.space.close()
