"""One real ceph-mon per test module (see :mod:`tests.ceph.mon`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.ceph.mon import CephMon, running_mon


@pytest.fixture(scope="module")
def ceph_mon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephMon]:
    with running_mon(tmp_path_factory.mktemp("ceph-mon")) as mon:
        yield mon


@pytest.fixture
def fresh_mon(tmp_path: os.PathLike[str]) -> Iterator[CephMon]:
    """A mon of this test alone, for tests that restart it: the restarted process is a
    new child, which must be gone before the no_leaks check of this very test."""
    from pathlib import Path
    with running_mon(Path(tmp_path)) as mon:
        yield mon
