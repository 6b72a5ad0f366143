"""The public names of asyncmsgr for applications and tools, in one place.

    from pool.api import Messenger, Dispatcher, Message, Policy, EntityType
"""

from protocol.features import EntityType
from protocol.message import PRIO_DEFAULT, PRIO_HIGH, PRIO_HIGHEST, PRIO_LOW, Message
from protocol.policy import Backoff, Policy
from transport.event_center import EventCenter

from .connection import AsyncConnection, ConnState
from .dispatcher import Dispatcher, HandshakeFailure
from .messenger import Messenger

__all__ = [
    "AsyncConnection", "Backoff", "ConnState", "Dispatcher", "EntityType", "EventCenter",
    "HandshakeFailure",
    "Message", "Messenger", "Policy", "PRIO_DEFAULT", "PRIO_HIGH", "PRIO_HIGHEST", "PRIO_LOW",
]
