"""Fixtures of the EventCenter tests: a center on every driver, and a pipe."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.transport.event_center.support import DRIVERS
from transport.event_center import EventCenter


@pytest.fixture(params=DRIVERS)
def center(request: pytest.FixtureRequest) -> Iterator[EventCenter]:
    c = EventCenter(driver=request.param, nevent=100, name=f"test-{request.param}")
    yield c
    c.close()


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass
