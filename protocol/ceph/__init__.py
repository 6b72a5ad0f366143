"""Ceph's own encodings: primitives, addresses, feature bits and message bodies.

Pure functions and frozen dataclasses over bytes (no I/O), used by the control-frame
codecs and by applications that talk to real Ceph daemons.
"""

from .addr import EntityAddr, parse_addr
from .encoding import Decoder, Encoder
from .messages import (
    MESSAGE_NAMES,
    CephBody,
    MMonCommand,
    MMonCommandAck,
    MMonGetVersion,
    MMonGetVersionReply,
    MMonSubscribe,
    MPing,
    message_name,
)

__all__ = [
    "MESSAGE_NAMES",
    "CephBody",
    "Decoder",
    "Encoder",
    "EntityAddr",
    "MMonCommand",
    "MMonCommandAck",
    "MMonGetVersion",
    "MMonGetVersionReply",
    "MMonSubscribe",
    "MPing",
    "message_name",
    "parse_addr",
]
