"""A fixed in-process Messenger echo, for instruction counts under callgrind.

Two Messengers (a stateful server and a lossless client) on one EventCenter, over
loopback TCP, 128 messages in flight, ``N`` echoed messages of ``SIZE`` bytes. Wall
clock on a shared VM moves by 30 % between runs; instructions do not, so A/B questions
of a few percent are settled with::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m tools.bench.echo_instructions SIZE 1000
    (the same with 5000; per message = (I_5000 - I_1000) / 4000, start-up cancels)
"""

from __future__ import annotations

import sys

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

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        self.n += 1


def run(size: int, n: int) -> None:
    center = EventCenter()
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


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(a.isdigit() for a in argv):
        print("usage: python -m tools.bench.echo_instructions SIZE N", file=sys.stderr)
        return 2
    run(int(argv[0]), int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
