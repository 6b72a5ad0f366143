"""``--app echo``: every message goes back on its connection with the same type, front
and data."""

from __future__ import annotations

from protocol.message import Message

from pool.api import AsyncConnection, Dispatcher

__all__ = ["EchoDispatcher"]


class EchoDispatcher(Dispatcher):
    """Reply to every message on the same connection with the same type, front and data."""

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        if msg.raw:  # a Ceph message: same bodies and header versions back
            conn.send_message(Message(msg.type, msg.front, msg.data, msg.priority, msg.tid,
                                      raw=True, middle=msg.middle, version=msg.version,
                                      compat_version=msg.compat_version))
        else:
            conn.send_message(Message(msg.type, msg.front, msg.data, msg.priority, msg.tid))
