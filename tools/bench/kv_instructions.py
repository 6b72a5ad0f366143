"""A fixed in-process kv pool, for instruction counts of a forwarded GET under callgrind.

Two KvApps (slots 0 and 1) on one EventCenter, joined by their real Routers over a real
shared-memory ring pair (made by :class:`~pool.supervisor.ring_mesh.RingMesh`, doorbells
included); one lossless client Messenger over loopback TCP to slot 0. It writes ``N``
keys, then sends ``N`` GETs one at a time (window 1, as ``msgr bench kv``): ``cross``
picks keys whose shard slot 1 owns (every GET goes over the ring and back), ``local``
keys slot 0 owns. Wall clock on a shared VM moves by 30 % between runs; instructions do
not::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m tools.bench.kv_instructions cross 500
    (the same with 1500; per GET = (I_1500 - I_500) / 1000 / 2, start-up cancels:
    N counts the PUTs too, one per GET)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from pool.api import (
    AsyncConnection,
    Dispatcher,
    EntityType,
    EventCenter,
    Message,
    Messenger,
    MessengerConfig,
    Policy,
)
from pool.apps.kv import KvApp, owners_for, shard_of
from pool.supervisor.ring_mesh import RingMesh
from pool.worker.app import PeerMap, ReplyCallback, WorkerContext
from pool.worker.router import Router
from tools.stress.kv import KV_MSG

__all__ = ["run"]


class _Context(WorkerContext):
    def __init__(self, slot: int, center: EventCenter) -> None:
        self.slot = slot
        self.center = center
        self.config: dict[str, Any] = {}
        self.router: Router | None = None

    def handoff(self, target_slot: int, fd: int, meta: bytes,
                on_result: Callable[[bool], None]) -> None:
        self.center.call_soon(lambda: on_result(False))

    def accepting_slots(self) -> list[int]:
        return [1 - self.slot]

    def drained(self) -> None:
        pass

    def submit_to(self, slot: int, payload: bytes, on_reply: ReplyCallback) -> None:
        assert self.router is not None
        self.router.submit(slot, payload, on_reply)

    def peer_map(self) -> PeerMap:
        return PeerMap(1, (0, 1))

    def log(self, msg: str) -> None:
        print(f"worker {self.slot}: {msg}", file=sys.stderr)


class _Rx(Dispatcher):
    def __init__(self) -> None:
        self.front: Any = None

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        self.front = msg.front


def run(kind: str, n: int) -> None:
    center = EventCenter()
    mesh = RingMesh()
    ctxs = [_Context(0, center), _Context(1, center)]
    apps = [KvApp(), KvApp()]
    for ctx, app in zip(ctxs, apps):
        ctx.router = Router(center, ctx.slot, app.handle_submit, ctx.log, spins=0)
        app.start(ctx)
    mesh.add_worker(0, [])
    for pair in mesh.add_worker(1, [0]):
        desc, fds = mesh.descriptor(pair)
        for ctx in ctxs:  # each Router owns its copies of the fds
            router = ctx.router
            assert router is not None
            router.add_ring(json.loads(desc), [os.dup(fd) for fd in fds])
    owners = owners_for([0, 1])
    assert owners is not None
    want = 1 if kind == "cross" else 0
    keys: list[str] = []
    i = 0
    while len(keys) < n:
        k = f"bench-{i}"
        i += 1
        if owners[shard_of(k)] == want:
            keys.append(k)
    server = apps[0].msgr_app.msgr
    assert server is not None
    client = Messenger(center, MessengerConfig(seed=2, nonce=2), entity_type=EntityType.CLIENT,
                       policy=Policy.lossless_client())
    rx = _Rx()
    client.add_dispatcher(rx)
    try:
        conn = client.connect(server.bind(("127.0.0.1", 0)))

        def call(op: str, key: str, val: bytes | None) -> Any:
            rx.front = None
            conn.send_message(Message(KV_MSG, {"op": op, "k": key, "v": val, "id": 1}))
            while rx.front is None:
                center.process_events(0.01)
            return rx.front

        for k in keys:
            assert call("put", k, k.encode() * 4)["ok"]
        for k in keys:
            r = call("get", k, None)
            assert r["ok"] and r["v"] == k.encode() * 4 and (r["w"] != r["at"]) == (want == 1)
    finally:
        client.shutdown()
        for app in apps:
            app.stop()
        for ctx in ctxs:
            if ctx.router is not None:
                ctx.router.close()
        mesh.close()
        center.process_events(0)
        center.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("cross", "local") or not argv[1].isdigit():
        print("usage: python -m tools.bench.kv_instructions cross|local N", file=sys.stderr)
        return 2
    run(argv[0], int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
