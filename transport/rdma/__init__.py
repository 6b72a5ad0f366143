"""The ``rdma`` stack: verbs queue pairs behind a narrow provider interface.

* :mod:`.verbs` - the provider interface (device, MR, CQ, RC QP) and its vocabulary.
* :mod:`.softverbs` - shared memory between processes: an EMULATION of RC semantics,
  always available, what CI runs.
* :mod:`.pyverbs_provider` - real libibverbs through pyverbs, imported lazily and used
  only when a device is listed.
* :mod:`.stack` - :class:`RdmaStack`, the NetworkStack over either provider.
"""

from .stack import RdmaStack, get_provider

__all__ = ["RdmaStack", "get_provider"]
