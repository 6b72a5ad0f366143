"""The ``dpdk`` stack: DPDK's memif shared-memory packet interface, in pure Python.

Layers: :mod:`.wire` (128-byte control messages, ring layout), :mod:`.control` (the
SEQPACKET channel), :mod:`.ring` (data path), :mod:`.interface` (handshakes, one memif
connection), :mod:`.stream` (reliable ordered byte stream over lossy frames),
:mod:`.stack` (:class:`MemifStack`, name "dpdk"). See shared/notes/memif.md.
"""

from .interface import (MemifConfig, MemifConnector, MemifDisconnected, MemifInterface,
                        MemifListener, MemifProtocolError, connect)

__all__ = ["MemifConfig", "MemifConnector", "MemifDisconnected", "MemifInterface",
           "MemifListener", "MemifProtocolError", "connect"]
from .stack import MemifServerSocket, MemifStack, StackConfig  # noqa: E402
from .stream import MemifStream  # noqa: E402

__all__ += ["MemifServerSocket", "MemifStack", "StackConfig", "MemifStream"]
