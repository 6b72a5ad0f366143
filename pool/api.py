"""The public names of asyncmsgr for applications and tools, in one place.

    from pool.api import Messenger, Dispatcher, Message, Policy, EntityType
"""

from protocol.accel import describe as per_message_path
from protocol.features import EntityType
from protocol.message import PRIO_DEFAULT, PRIO_HIGH, PRIO_HIGHEST, PRIO_LOW, Message
from protocol.policy import Backoff, Policy
from transport.event_center import EventCenter

from .messenger.auth import AuthSettings, KeyringError, load_keyring, write_keyring
from .messenger.config import MessengerConfig
from .messenger.connection import AsyncConnection
from .messenger.dispatcher import Dispatcher
from .messenger.failure import HandshakeFailure
from .messenger.messenger import Messenger
from .messenger.monclient import MonClient, MonError
from .messenger.states import ConnState

__all__ = [
    "AsyncConnection", "AuthSettings", "Backoff", "ConnState", "Dispatcher", "EntityType",
    "EventCenter", "HandshakeFailure", "KeyringError", "Message", "Messenger", "MessengerConfig", "MonClient",
    "MonError", "Policy", "PRIO_DEFAULT", "PRIO_HIGH", "PRIO_HIGHEST", "PRIO_LOW",
    "load_keyring", "per_message_path", "write_keyring",
]
