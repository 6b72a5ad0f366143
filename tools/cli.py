"""``msgr``: the command line. Each subcommand lives in its own module exposing
``register(subparsers)``, which adds a parser whose ``func(args) -> int`` runs it."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from pool.api import per_message_path

__all__ = ["MODULES", "build_parser", "main"]

#: Subcommand modules, in help order. Every one must import: a missing or broken module is
#: an installation error, raised, never a subcommand that silently disappears.
MODULES = ["tools.serve", "tools.admin_cmds", "tools.stress.cli", "tools.demo", "tools.bench.cli",
           "tools.ceph_cmds"]


def _version() -> str:
    try:
        return importlib.metadata.version("asyncmsgr")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msgr", description="asyncmsgr worker pool")
    parser.add_argument("--version", action="version",
                        version=f"asyncmsgr {_version()}, per-message path: {per_message_path()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
