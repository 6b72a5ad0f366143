"""A fixed in-process Messenger echo, for instruction counts under callgrind.

Two Messengers (a stateful server and a lossless client) on one EventCenter, over
loopback TCP, 128 messages in flight, ``N`` echoed messages of ``SIZE`` bytes. Wall
clock on a shared VM moves by 30 % between runs; instructions do not, so A/B questions
of a few percent are settled with::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m tools.bench.echo_instructions SIZE 1000
    (the same with 5000; per message = (I_5000 - I_1000) / 4000, start-up cancels)

A third argument, ``epoll``, ``asyncio`` or ``uvloop``, runs the same echo the way a
worker runs its loop on that driver (``EventCenter.run``; on asyncio and uvloop the
center's ``serve()`` inside the running loop), with replies topping up the window: the
cost of each driver, same workload, same structure.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from pool.api import (
    AsyncConnection, Dispatcher, EntityType, EventCenter, Message, Messenger, MessengerConfig,
    Policy,
)

WINDOW = 128


class _Echo(Dispatcher):
    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        conn.send_message(Message(msg.type, msg.front, data=msg.data))


class _Count(Dispatcher):
    def __init__(self) -> None:
        self.n = 0
        self.on_reply: Callable[[], None] | None = None

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        self.n += 1
        if self.on_reply is not None:
            self.on_reply()


def run(size: int, n: int, driver: str | None = None) -> None:
    center = EventCenter() if driver is None else EventCenter(driver=driver)
    server = Messenger(center, MessengerConfig(seed=1, nonce=1), entity_type=EntityType.OSD,
                       policy=Policy.stateful_server())
    server.add_dispatcher(_Echo())
    client = Messenger(center, MessengerConfig(seed=2, nonce=2), entity_type=EntityType.CLIENT,
                       policy=Policy.lossless_client())
    count = _Count()
    client.add_dispatcher(count)
    try:
        conn = client.connect(server.bind(("127.0.0.1", 0)))
        payload = bytes(size)
        sent = 0
        if driver is not None:
            _run_as_a_worker(center, conn, count, payload, n)
        while count.n < n:
            while sent - count.n < WINDOW and sent < n:
                conn.send_message(Message(1, None, data=payload))
                sent += 1
            center.process_events(0.01)
    finally:
        server.shutdown()
        client.shutdown()
        center.process_events(0)
        center.close()


def _run_as_a_worker(center: EventCenter, conn: AsyncConnection, count: _Count,
                     payload: bytes, n: int) -> None:
    sent = 0

    def top_up() -> None:
        nonlocal sent
        while sent - count.n < WINDOW and sent < n:
            conn.send_message(Message(1, None, data=payload))
            sent += 1
        if count.n >= n:
            center.stop()

    count.on_reply = top_up
    top_up()
    center.run(max_wait=0.01)


DRIVERS = ("epoll", "asyncio", "uvloop")


def main(argv: list[str]) -> int:
    if not 2 <= len(argv) <= 3 or not all(a.isdigit() for a in argv[:2]) or \
            (len(argv) == 3 and argv[2] not in DRIVERS):
        print("usage: python -m tools.bench.echo_instructions SIZE N [epoll|asyncio|uvloop]",
              file=sys.stderr)
        return 2
    run(int(argv[0]), int(argv[1]), argv[2] if len(argv) == 3 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
