"""The layering rule of DESIGN.md, checked on every module's imports with ``ast``.

protocol/ is sans-I/O (no sockets, clocks, processes) and imports neither transport nor
pool; transport/ knows nothing of messages; stacks import only transport's core, never
each other; tools/ uses pool's and transport's public names, not protocol internals.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "protocol": {"transport", "pool", "tools", "socket", "select", "selectors", "asyncio",
                 "multiprocessing", "multiprocess", "threading", "mmap", "posix_ipc",
                 "subprocess", "signal", "time", "os"},
    "transport": {"protocol", "pool", "tools", "msgpack"},
    "pool": {"tools"},
    "tools": {"protocol"},
}
STACKS = ("posix", "shm", "dpdk", "memif", "rdma")


def _imports(tree: ast.AST, rel: Path) -> list[tuple[int, str]]:
    package = list(rel.parts[:-1])
    if rel.name == "__init__.py":
        package = list(rel.parts[:-1])
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append((node.lineno, node.module or ""))
                continue
            base = package[: len(package) - (node.level - 1)]
            name = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                out.append((node.lineno, name))
            else:
                out += [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return out


def _violations() -> list[str]:
    problems = []
    for package, banned in FORBIDDEN.items():
        for file in sorted((ROOT / package).rglob("*.py")):
            rel = file.relative_to(ROOT)
            tree = ast.parse(file.read_text(encoding="utf-8"), str(rel))
            own = rel.parts[1] if package == "transport" and len(rel.parts) > 2 else None
            for lineno, name in _imports(tree, rel):
                parts = name.split(".")
                if parts[0] in banned:
                    problems.append(f"{rel}:{lineno}: {package}/ must not import {name}")
                if own in STACKS and len(parts) > 1 and parts[0] == "transport" \
                        and parts[1] in STACKS and parts[1] != own:
                    problems.append(f"{rel}:{lineno}: stack {own} must not import stack {parts[1]}")
    return problems


def test_layering_rule_holds() -> None:
    assert _violations() == []


def test_checker_catches_a_forbidden_edge(tmp_path: Path) -> None:
    """The checker itself must be able to fail: feed it a module that breaks the rule."""
    src = "import socket\nfrom transport import stack\n"
    found = [n for _, n in _imports(ast.parse(src), Path("protocol/x.py"))]
    assert found == ["socket", "transport"]
    rel = Path("transport/posix/conn.py")
    found = [n for _, n in _imports(ast.parse("from ..rdma import verbs\n"), rel)]
    assert found == ["transport.rdma"]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_exists(package: str) -> None:
    assert (ROOT / package / "__init__.py").exists()
