"""The ``rdma`` stack: verbs queue pairs behind a narrow provider interface.

Providers: ``softverbs`` (shared-memory EMULATION, always available) and ``pyverbs``
(real libibverbs, used only when a device is listed). See :mod:`.verbs`.
"""
