"""The ring mesh in a real pool: one ring per ordered pair of live workers, following
scale up/down, gone from /dev/shm on stop; ``submit_to`` across workers; a crashed
worker's in-flight requests fail explicitly at the submitter."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from pool.api import (
    AsyncConnection, Backoff, Dispatcher, EntityType, EventCenter, Message, Messenger,
    MessengerConfig, Policy,
)
from pool.worker.app import ReplyCallback
from pool.apps import MessengerApp
from transport import shmname

from .support import running_pool, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

SUBMIT = 7


class _SubmitDispatcher(Dispatcher):
    """Front ``{"to": slot, "op": bytes}``: ``submit_to(slot, op)``, reply with the result."""

    def __init__(self, app: SubmitApp) -> None:
        self.app = app

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        ctx = self.app.ctx
        assert ctx is not None
        front = msg.front

        def on_reply(r: bytes | Exception) -> None:
            out: dict[str, Any] = {"me": ctx.slot, "ok": not isinstance(r, Exception)}
            out["r"] = f"{type(r).__name__}: {r}" if isinstance(r, Exception) else bytes(r)
            conn.send_message(Message(SUBMIT, out))

        if front["op"] == b"flood":
            self._flood(conn, ctx, front)
            return
        ctx.submit_to(int(front["to"]), bytes(front["op"]), on_reply)

    def _flood(self, conn: AsyncConnection, ctx: Any, front: dict[str, Any]) -> None:
        """Submit ``n`` requests of ``size`` bytes at once; reply with how each ended."""
        n = int(front["n"])
        counts: dict[str, int] = {}

        def one(r: bytes | Exception) -> None:
            kind = "ok" if not isinstance(r, Exception) else type(r).__name__
            counts[kind] = counts.get(kind, 0) + 1
            if sum(counts.values()) == n:
                out: dict[str, Any] = dict(counts)
                out["backlogged"] = ctx.router.stats["backlogged"]  # Worker internals: test only
                conn.send_message(Message(SUBMIT, out))

        pad = b"x" * int(front["size"])
        for _ in range(n):
            ctx.submit_to(int(front["to"]), b"echo" + pad, one)


class SubmitApp(MessengerApp):
    """Serves ``echo`` (answers at once) and ``hang`` (never answers)."""

    def __init__(self) -> None:
        super().__init__(lambda: _SubmitDispatcher(self))
        self.hung: list[ReplyCallback] = []

    def handle_submit(self, src_slot: int, payload: bytes, reply: ReplyCallback) -> None:
        assert self.ctx is not None
        if payload == b"hang":
            self.hung.append(reply)
        else:
            reply(b"pong %d from %d" % (self.ctx.slot, src_slot))


class _Client(Dispatcher):
    def __init__(self) -> None:
        self.replies: list[dict[str, Any]] = []

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        self.replies.append(msg.front)


def _ring_memfds(pid: int) -> set[str]:
    """The ring memfds process ``pid`` holds (``/memfd:amsgr-r<src>x<dst>g<n> (deleted)``;
    Python's mmap keeps its own dup of the fd, so count names, not fds)."""
    out = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return set()
    for fd in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("/memfd:amsgr-r"):
            out.add(link)
    return out


def _accepting(st: dict[str, Any]) -> list[int]:
    return sorted(w["slot"] for w in st["workers"] if w["state"] == "ACCEPTING")


def _mesh_complete(pool: Any, n: int) -> dict[str, Any] | None:
    st = pool.try_status()
    if st is None:
        return None
    live = _accepting(st)
    want = sorted([a, b] for a in live for b in live if a != b)
    return st if len(live) == n and st["rings"] == want else None


def test_mesh_follows_scale(tmp_path: Path) -> None:
    with running_pool(tmp_path, workers=3, app="echo") as pool:
        st = wait_for(lambda: _mesh_complete(pool, 3), 10, "a full mesh of 3")
        assert len(st["rings"]) == 6
        assert len(_ring_memfds(st["pid"])) == 6
        # Each worker attached its 2 * (n - 1) rings (memfds: nothing named in /dev/shm).
        for w in st["workers"]:
            wait_for(lambda w=w: len(_ring_memfds(w["pid"])) == 4, 10, f"worker {w['slot']} attached")
        assert not [s for s in shmname.list_segments() if shmname.owner_of(s) == st["pid"]
                    and not s.endswith(".control")]
        pool.client.call("scale", n=2)
        pool.wait_accepting(2)
        st = wait_for(lambda: _mesh_complete(pool, 2), 10, "mesh of 2 after scale-down")
        wait_for(lambda: len(_ring_memfds(st["pid"])) == 2, 10, "retired rings closed")
        for w in st["workers"]:
            if w["state"] == "ACCEPTING":
                wait_for(lambda w=w: len(_ring_memfds(w["pid"])) == 2, 10, "peers dropped retired rings")
        pool.client.call("scale", n=4)
        pool.wait_accepting(4)
        st = wait_for(lambda: _mesh_complete(pool, 4), 10, "mesh of 4 after scale-up")
        assert len(_ring_memfds(st["pid"])) == 12
        assert st["peer_map"]["slots"] == _accepting(st)
        sup = st["pid"]
    assert _ring_memfds(sup) == set()


def test_submit_to_and_crash_fails_inflight(tmp_path: Path) -> None:
    with running_pool(tmp_path, workers=3, app="tests.pool.test_rings_pool:SubmitApp") as pool:
        st = wait_for(lambda: _mesh_complete(pool, 3), 10, "a full mesh of 3")
        center = EventCenter(name="test-submit")
        client = _Client()
        m = Messenger(center, MessengerConfig(backoff=Backoff(0.05, 1.0)),
                      entity_type=EntityType.CLIENT, policy=Policy.lossless_client())
        m.add_dispatcher(client)
        try:
            conn = m.connect(("127.0.0.1", pool.port))

            def ask(to: int, op: bytes) -> None:
                conn.send_message(Message(SUBMIT, {"to": to, "op": op}))

            def reply(n: int, timeout: float = 10.0) -> dict[str, Any]:
                deadline = time.monotonic() + timeout
                while len(client.replies) < n and time.monotonic() < deadline:
                    center.process_events(0.02)
                assert len(client.replies) >= n, client.replies
                return client.replies[n - 1]

            ask(99, b"echo")  # no such worker: explicit PeerUnavailable
            first = reply(1)
            assert not first["ok"] and "PeerUnavailable" in first["r"]
            me = first["me"]
            others = [s for s in _accepting(st) if s != me]
            for i, s in enumerate(others):
                ask(s, b"echo")
                r = reply(2 + i)
                assert r["ok"] and r["r"] == b"pong %d from %d" % (s, me)
            victim = others[0]
            ask(victim, b"hang")
            ask(victim, b"echo")  # FIFO ring: once this is answered, the hang arrived
            r = reply(len(others) + 2)
            assert r["ok"], r
            pid = next(w["pid"] for w in pool.status()["workers"] if w["slot"] == victim)
            os.kill(pid, signal.SIGKILL)
            r = reply(len(others) + 3)
            assert not r["ok"] and "PeerLost" in r["r"], r
            # The slot is respawned with fresh rings and serves again.
            pool.wait_accepting(3)
            wait_for(lambda: _mesh_complete(pool, 3), 10, "mesh rebuilt after the crash")
            deadline = time.monotonic() + 10
            while True:
                n = len(client.replies) + 1
                ask(victim, b"echo")
                r = reply(n)
                if r["ok"] or time.monotonic() > deadline:
                    break
            assert r["ok"], r
        finally:
            m.shutdown()
            center.process_events(0)
            center.close()


def test_inflight_limit_queue_and_full_ring_backpressure(tmp_path: Path) -> None:
    """64 in flight per destination, 200 queued, the rest refused (Overloaded); 64 x 8 KB
    requests overflow a 64 KiB ring: they wait for space (backlog), none is dropped."""
    cfg = '{"submit_inflight": 64, "submit_queue": 200, "ring_capacity": 65536}'
    with running_pool(tmp_path, workers=2, app="tests.pool.test_rings_pool:SubmitApp",
                      extra=("--app-config", cfg)) as pool:
        wait_for(lambda: _mesh_complete(pool, 2), 10, "a full mesh of 2")
        center = EventCenter(name="test-flood")
        client = _Client()
        m = Messenger(center, MessengerConfig(backoff=Backoff(0.05, 1.0)),
                      entity_type=EntityType.CLIENT, policy=Policy.lossless_client())
        m.add_dispatcher(client)
        try:
            conn = m.connect(("127.0.0.1", pool.port))
            conn.send_message(Message(SUBMIT, {"to": 99, "op": b"echo"}))
            deadline = time.monotonic() + 10
            while not client.replies and time.monotonic() < deadline:
                center.process_events(0.02)
            other = 1 - client.replies[0]["me"]
            conn.send_message(Message(SUBMIT, {"to": other, "op": b"flood", "n": 500, "size": 8000}))
            deadline = time.monotonic() + 20
            while len(client.replies) < 2 and time.monotonic() < deadline:
                center.process_events(0.02)
            assert len(client.replies) == 2, client.replies
            r = client.replies[1]
            assert r.get("ok") == 264 and r.get("Overloaded") == 236, r
            assert r["backlogged"] > 0, r  # the ring filled up and records waited for space
        finally:
            m.shutdown()
            center.process_events(0)
            center.close()
