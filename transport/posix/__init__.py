"""The kernel-socket stack: TCP (IPv4, IPv6) and Unix stream sockets (Ceph's ``PosixStack``)."""

from __future__ import annotations

from .sockets import IOV_MAX, PosixConnectedSocket, PosixServerSocket, PosixStack

__all__ = ["IOV_MAX", "PosixConnectedSocket", "PosixServerSocket", "PosixStack"]
