"""Conformance factories for the dpdk (memif) stack: filesystem and abstract control sockets."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile

from transport.event_center import EventCenter
from transport.memif import MemifConfig, MemifStack, StackConfig
from transport.stack import Address, NetworkStack


class MemifFsFactory:
    name = "memif-fs"
    skip_reason: str | None = None

    def setup(self) -> None:
        self._stack = MemifStack()
        self._dir = tempfile.mkdtemp(prefix="amsgr-memif-")
        self._seq = itertools.count()

    def teardown(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def stack(self) -> NetworkStack:
        return self._stack

    def listen_address(self) -> Address:
        return f"{self._dir}/m{next(self._seq)}.sock"


class MemifAbstractFactory(MemifFsFactory):
    name = "memif-abstract"

    def listen_address(self) -> Address:
        # DPDK's default namespace (memif.md §3.2); unique per process and call.
        return f"@amsgr-memif-{os.getpid()}-{next(self._seq)}"


class MemifPollFactory(MemifAbstractFactory):
    """Poll mode: MASK_INT set on every rx ring, no kicks; a busy poller per connection."""

    name = "memif-poll"

    def setup(self) -> None:
        super().setup()
        self._stack = MemifStack(StackConfig(memif=MemifConfig(interrupt=False, hugepages=False)))

    def bind_center(self, center: EventCenter) -> None:
        self._center = center

    def stack(self) -> NetworkStack:
        self._stack.bind_center(self._center)
        return self._stack


FACTORIES = [MemifFsFactory(), MemifAbstractFactory(), MemifPollFactory()]
