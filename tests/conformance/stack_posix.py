"""Conformance factories for the posix stack: TCP on 127.0.0.1 and Unix sockets."""

from __future__ import annotations

import itertools
import shutil
import tempfile

from transport.posix import PosixStack
from transport.stack import Address, NetworkStack


class PosixTcpFactory:
    name = "posix-tcp"
    skip_reason: str | None = None

    def setup(self) -> None:
        self._stack = PosixStack()

    def teardown(self) -> None:
        pass

    def stack(self) -> NetworkStack:
        return self._stack

    def listen_address(self) -> Address:
        return ("127.0.0.1", 0)


class PosixUnixFactory:
    name = "posix-unix"
    skip_reason: str | None = None

    def setup(self) -> None:
        self._stack = PosixStack()
        self._dir = tempfile.mkdtemp(prefix="amsgr-conf-")
        self._seq = itertools.count()

    def teardown(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def stack(self) -> NetworkStack:
        return self._stack

    def listen_address(self) -> Address:
        return f"{self._dir}/s{next(self._seq)}.sock"


FACTORIES = [PosixTcpFactory(), PosixUnixFactory()]
