"""The ``dpdk`` stack: DPDK's memif shared-memory packet interface, in pure Python.

Layers: :mod:`.wire` (128-byte control messages, ring layout), :mod:`.control` (the
SEQPACKET channel), :mod:`.ring` (data path), :mod:`.interface` (one memif connection),
:mod:`.client` / :mod:`.server` (the two handshakes), :mod:`.segments` (reliable ordered
delivery over lossy frames), :mod:`.stream` (the byte stream socket), :mod:`.stack`
(:class:`MemifStack`, name "dpdk"). See shared/notes/memif.md.
"""

from .client import MemifConnector, connect
from .interface import (
           MemifConfig,
           MemifDisconnected,
           MemifInterface,
           MemifProtocolError,
)
from .server import MemifListener

__all__ = ["MemifConfig", "MemifConnector", "MemifDisconnected", "MemifInterface",
           "MemifListener", "MemifProtocolError", "connect"]
from .stack import MemifServerSocket, MemifStack, StackConfig
from .stream import MemifStream

__all__ += ["MemifServerSocket", "MemifStack", "MemifStream", "StackConfig"]
