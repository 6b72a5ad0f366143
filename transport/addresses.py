"""Endpoint addresses written as text: ``HOST:PORT``, ``[v6]:PORT`` or a Unix socket path."""

from __future__ import annotations

from .stack import Address

__all__ = ["parse_address", "split_host_port"]


def split_host_port(text: str, default_host: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; empty host: ``default_host``), or None."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or default_host, int(port)


def parse_address(text: str | Address, default_host: str = "127.0.0.1") -> Address:
    """An address to connect to: ``HOST:PORT`` text, a path (``/...`` or abstract
    ``\\0...``), or an Address already; ValueError naming the text otherwise."""
    if not isinstance(text, str):
        return text
    if text.startswith("/") or text.startswith("\0"):
        return text
    hp = split_host_port(text, default_host)
    if hp is None or not 0 < hp[1] <= 65535:
        raise ValueError(f"address {text!r} must be HOST:PORT (e.g. 127.0.0.1:6800, "
                         "[::1]:6800) or a Unix socket path")
    return hp
