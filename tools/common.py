"""Helpers every ``msgr`` tool needs: waiting on a pool's status, host:port parsing, a
free port, percentiles. Imports pool's and transport's public names only."""

from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from pool.supervisor.admin import AdminClient, AdminError
from transport.addresses import parse_address, split_host_port
from transport.stack import Address

__all__ = ["NotReady", "free_port", "parse_bind", "parse_target", "percentile", "split_host_port",
           "wait_status"]

Status = dict[str, Any]


class NotReady(Exception):
    """:func:`wait_status` gave up; ``last`` is the latest status it read (None: none)."""

    def __init__(self, last: Status | None) -> None:
        super().__init__("the pool did not reach the condition in time")
        self.last = last


def wait_status(admin: str | AdminClient, until: Callable[[Status], bool], timeout: float,
                poll: float = 0.05, *, alive: Callable[[], bool] | None = None,
                tolerate: tuple[type[Exception], ...] = (OSError, AdminError),
                client_timeout: float | None = None) -> Status:
    """Poll the pool's ``status`` until ``until(status)``; returns that status.

    ``admin`` is a socket path (a fresh client per poll: the pool may not be up yet) or
    a client. Errors of the ``tolerate`` types count as "not yet"; others propagate.
    Raises :class:`NotReady` past ``timeout`` or as soon as ``alive()`` is false.
    """
    deadline = time.monotonic() + timeout
    last: Status | None = None
    while True:
        if alive is not None and not alive():
            raise NotReady(last)
        try:
            if isinstance(admin, AdminClient):
                client = admin
            elif client_timeout is None:
                client = AdminClient(admin)
            else:
                client = AdminClient(admin, timeout=client_timeout)
            st = client.call("status")
        except tolerate:
            pass
        else:
            last = st
            if until(st):
                return st
        if time.monotonic() > deadline:
            raise NotReady(last)
        time.sleep(poll)  # polling the pool's own status, bounded by the deadline


def parse_bind(text: str, option: str = "--bind") -> tuple[str, int]:
    """A listening address; an empty host means every interface."""
    hp = split_host_port(text, "0.0.0.0")
    if hp is None or not 0 <= hp[1] <= 65535:
        raise ValueError(f"{option} {text!r} must be HOST:PORT, e.g. 127.0.0.1:6800")
    return hp


def parse_target(text: str) -> Address:
    """HOST:PORT (IPv6 as [::1]:PORT) or a Unix socket path (an argparse type)."""
    try:
        return parse_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"target {text!r} must be HOST:PORT or a socket path") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float, empty: float = float("nan"),
               presorted: bool = False) -> float:
    """The ``q`` quantile (0..1) by rank: element ``int(len * q)`` of the sorted values."""
    if not values:
        return empty
    s = values if presorted else sorted(values)
    return float(s[min(len(s) - 1, int(len(s) * q))])
