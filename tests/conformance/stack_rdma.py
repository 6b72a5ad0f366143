"""Conformance factory for the rdma stack over ``softverbs`` — an EMULATION of RDMA over
shared memory (no RDMA device here); the side channel is a Unix SEQPACKET socket."""

from __future__ import annotations

import itertools
import shutil
import tempfile

from transport.rdma.stack import RdmaStack
from transport.stack import Address, NetworkStack


class RdmaSoftverbsFactory:
    name = "rdma-softverbs-EMULATION"
    skip_reason: str | None = None

    def setup(self) -> None:
        self._stack = RdmaStack("softverbs")
        self._dir = tempfile.mkdtemp(prefix="amsgr-rdma-")
        self._seq = itertools.count()

    def teardown(self) -> None:
        self._stack.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def stack(self) -> NetworkStack:
        return self._stack

    def listen_address(self) -> Address:
        return f"{self._dir}/r{next(self._seq)}.sock"


FACTORY = RdmaSoftverbsFactory()
