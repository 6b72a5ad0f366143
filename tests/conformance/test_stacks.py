"""Runs every check of :mod:`tests.conformance.suite` on every stack that registered a
``tests/conformance/stack_<name>.py`` module (see the suite's module doc)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from transport.event_center import EventCenter
from transport.stack import Address, NetworkStack

from .suite import CHECKS, Harness, StackFactory


class _BrokenModule:
    """Stands in for a stack module that failed to import: its tests fail, others run."""

    skip_reason: str | None = None

    def __init__(self, name: str, error: BaseException) -> None:
        self.name = name
        self.error = error

    def setup(self) -> None:
        raise RuntimeError(f"importing {self.name} failed: {self.error!r}") from self.error

    def teardown(self) -> None:
        pass

    def stack(self) -> NetworkStack:  # pragma: no cover - setup already failed
        raise NotImplementedError

    def listen_address(self) -> Address:  # pragma: no cover
        raise NotImplementedError


def discover() -> list[StackFactory]:
    found: list[StackFactory] = []
    here = str(Path(__file__).parent)
    for info in sorted(pkgutil.iter_modules([here]), key=lambda i: i.name):
        if not info.name.startswith("stack_"):
            continue
        try:
            module = importlib.import_module(f"{__package__}.{info.name}")
        except Exception as exc:  # noqa: BLE001 - reported through the tests
            found.append(_BrokenModule(info.name, exc))
            continue
        factories = getattr(module, "FACTORIES", None)
        if factories is None:
            factories = [module.FACTORY]
        found.extend(factories)
    return found


FACTORIES = discover()


@pytest.fixture(params=FACTORIES, ids=[f.name for f in FACTORIES])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    factory: StackFactory = request.param
    if factory.skip_reason is not None:
        pytest.skip(factory.skip_reason)
    factory.setup()
    try:
        center = EventCenter(name=f"conformance-{factory.name}")
        try:
            h = Harness(factory, center)
            try:
                yield h
            finally:
                h.close()
        finally:
            center.close()
    finally:
        factory.teardown()


def test_discovery_finds_posix() -> None:
    assert {"posix-tcp", "posix-unix"} <= {f.name for f in FACTORIES}
    assert len({f.name for f in FACTORIES}) == len(FACTORIES), "factory names must be unique"


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
def test_conformance(harness: Harness, check: Callable[[Harness], None]) -> None:
    check(harness)


def test_harness_binds_center_and_fails_fast_on_callback_errors() -> None:
    """Harness plumbing other stacks rely on: ``bind_center`` is called before
    ``stack()``, and an exception inside a callback fails ``pump`` at once."""
    from .stack_posix import PosixTcpFactory

    class Bound(PosixTcpFactory):
        name = "bound"
        seen: ClassVar[list[EventCenter]] = []

        def bind_center(self, center: EventCenter) -> None:
            self.seen.append(center)

    factory = Bound()
    factory.setup()
    center = EventCenter()
    h = Harness(factory, center)
    try:
        assert factory.seen == [center]

        def boom() -> None:
            raise ValueError("inside a callback")

        center.call_soon(boom)
        with pytest.raises(ValueError):
            h.pump(lambda: False, limit=10.0)
    finally:
        h.close()
        center.close()
        factory.teardown()
