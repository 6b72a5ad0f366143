"""Fixtures of the rdma stack tests: a private socket directory and a softverbs stack."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from transport.rdma.stack import RdmaStack


@pytest.fixture
def tmpdir_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="amsgr-rdma-t-")
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


@pytest.fixture
def stack() -> Iterator[RdmaStack]:
    s = RdmaStack("softverbs", chunk_size=4096, rx_chunks=8, tx_chunks=8)
    yield s
    s.close()
