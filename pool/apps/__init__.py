"""Apps a pool can serve: the registry (``--app``), the Messenger-backed WorkerApp, echo,
the sharded kv store, and the session handoff between workers.

    from pool.apps import MessengerApp, EchoDispatcher, load_app, DEFAULT_RETENTION
"""

from .echo import EchoDispatcher
from .messenger_app import DEFAULT_RETENTION, MessengerApp, retention_caps
from .registry import APPS, load_app

__all__ = ["APPS", "DEFAULT_RETENTION", "EchoDispatcher", "MessengerApp", "load_app",
           "retention_caps"]
