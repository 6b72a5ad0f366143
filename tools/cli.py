"""``msgr``: the command line. Each subcommand lives in its own module exposing
``register(subparsers)``, which adds a parser whose ``func(args) -> int`` runs it."""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["MODULES", "build_parser", "main"]

#: Subcommand modules, in help order. Every one must import: a missing or broken module is
#: an installation error, raised, never a subcommand that silently disappears.
MODULES = ["tools.serve", "tools.admin_cmds", "tools.stress.cli", "tools.demo", "tools.bench.cli",
           "tools.ceph_cmds"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msgr", description="asyncmsgr worker pool")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
