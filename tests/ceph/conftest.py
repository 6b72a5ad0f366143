"""One real ceph-mon per test module (see :mod:`tests.ceph.mon`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.ceph.mon import CephMon, require_ceph


@pytest.fixture(scope="module")
def ceph_mon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephMon]:
    require_ceph()
    mon = CephMon(tmp_path_factory.mktemp("ceph-mon"))
    mon.bootstrap()
    mon.start()
    try:
        yield mon
    finally:
        mon.stop()


@pytest.fixture
def fresh_mon(tmp_path: os.PathLike[str]) -> Iterator[CephMon]:
    """A mon of this test alone, for tests that restart it: the restarted process is a
    new child, which must be gone before the no_leaks check of this very test."""
    from pathlib import Path
    require_ceph()
    mon = CephMon(Path(tmp_path))
    mon.bootstrap()
    mon.start()
    try:
        yield mon
    finally:
        mon.stop()
