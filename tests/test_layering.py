"""The layering rule of DESIGN.md, checked on every module's imports with ``ast``.

protocol/ is sans-I/O (no sockets, clocks, processes) and imports neither transport nor
pool; transport/ knows nothing of messages; stacks import only transport's core, never
each other; tools/ uses pool's and transport's public names, not protocol internals.
No two modules of the project import each other, directly or around a circle (imports
inside functions and under TYPE_CHECKING count too); pool/ names no concrete stack
class; non-test code reaches no other object's underscore members.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
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
#: (file, module) pairs exempt from FORBIDDEN, each with its reason
FORBIDDEN_EXEMPT: dict[tuple[str, str], str] = {
    ("protocol/accel.py", "os"): "reads ASYNCMSGR_NO_EXTENSIONS once at import (the aiohttp/yarl "
                                 "convention) to choose the compiled or pure-Python path; no I/O",
}


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
                if parts[0] in banned and (str(rel), name) not in FORBIDDEN_EXEMPT:
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


#: inside pool/: the contract imports neither side, a worker never imports its supervisor,
#: the messenger library knows nothing of process management (nor of its own front door)
POOL_FORBIDDEN = {
    "pool/control": ("pool.supervisor", "pool.worker", "pool.apps", "pool.messenger"),
    "pool/worker": ("pool.supervisor", "pool.apps", "pool.messenger"),
    "pool/messenger": ("pool.supervisor", "pool.worker", "pool.control", "pool.apps",
                       "pool.api"),
}


def test_pool_process_layers() -> None:
    problems = []
    for folder, banned in POOL_FORBIDDEN.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT)
            for lineno, name in _imports(ast.parse(f.read_text(encoding="utf-8")), rel):
                if any(name == b or name.startswith(b + ".") for b in banned):
                    problems.append(f"{rel}:{lineno}: {folder}/ must not import {name}")
    assert problems == []


# -- import cycles ------------------------------------------------------------------------

PROJECT = ("protocol", "transport", "pool", "tools")
#: Circles allowed for now, each with the reason. An entry that no longer matches a
#: circle fails the test too: delete it.
CYCLE_ALLOWLIST: dict[frozenset[str], str] = {
}


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(f.relative_to(ROOT)): f
            for package in PROJECT for f in sorted((ROOT / package).rglob("*.py"))}


def _edges(tree: ast.AST, rel: Path, modules: set[str]) -> set[str]:
    """Project modules this module imports, anywhere in it; ``from X import Y`` names
    module ``X.Y`` when Y is one, else ``X``."""
    out: set[str] = set()
    package = list(rel.parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                prefix = package[: len(package) - (node.level - 1)]
                base = ".".join(prefix + ([node.module] if node.module else []))
            # ``from P import m`` with m a submodule imports m, not (for this purpose) P's
            # __init__: Python binds the submodule even while P is still initialising.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n in modules)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _project_modules()
    return {name: _edges(ast.parse(f.read_text(encoding="utf-8")), f.relative_to(ROOT), set(mods))
            for name, f in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    unexpected = [sorted(c) for c in cycles if c not in CYCLE_ALLOWLIST]
    stale = [sorted(c) for c in CYCLE_ALLOWLIST if c not in cycles]
    assert unexpected == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in unexpected)
    assert stale == [], f"allowlisted cycles that are gone (delete their entries): {stale}"


def test_cycle_checker_sees_function_level_imports(tmp_path: Path) -> None:
    a = ast.parse("def f() -> None:\n    from . import b\n")
    b = ast.parse("from pool.x import a\n")
    mods = {"pool.x.a", "pool.x.b", "pool.x"}
    graph = {"pool.x.a": _edges(a, Path("pool/x/a.py"), mods),
             "pool.x.b": _edges(b, Path("pool/x/b.py"), mods)}
    assert graph["pool.x.a"] == {"pool.x.b"}
    assert _cycles(graph) == [frozenset({"pool.x.a", "pool.x.b"})]


# -- pool/ and the concrete stacks -----------------------------------------------------------

#: pool/ files that still name a concrete stack class, with the reason
STACK_NAME_ALLOWLIST: dict[str, str] = {}
_STACK_BASES = {"NetworkStack", "ServerSocket", "ConnectedSocket"}


def _concrete_stack_classes() -> set[str]:
    """Classes of the stack packages that derive (within them) from the stack interfaces."""
    bases: dict[str, set[str]] = {}
    for stack in STACKS:
        for f in sorted((ROOT / "transport" / stack).rglob("*.py")) if (ROOT / "transport" / stack).is_dir() else ():
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    bases[node.name] = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
    concrete: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, bs in bases.items():
            if name not in concrete and bs & (_STACK_BASES | concrete):
                concrete.add(name)
                changed = True
    return concrete


def _names(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, ast.alias):
            yield node.lineno, node.name.rsplit(".", 1)[-1]


def test_pool_names_no_concrete_stack_class() -> None:
    concrete = _concrete_stack_classes()
    assert {"PosixStack", "PosixServerSocket", "PosixConnectedSocket"} <= concrete
    problems = []
    allowed_and_used = set()
    for f in sorted((ROOT / "pool").rglob("*.py")):
        rel = str(f.relative_to(ROOT))
        for lineno, name in _names(ast.parse(f.read_text(encoding="utf-8"))):
            if name not in concrete:
                continue
            if rel in STACK_NAME_ALLOWLIST:
                allowed_and_used.add(rel)
            else:
                problems.append(f"{rel}:{lineno}: names {name} (ask transport.kernel.fd_stack())")
    assert problems == []
    assert set(STACK_NAME_ALLOWLIST) - allowed_and_used == set(), "stale entries: delete them"


# -- private reach ---------------------------------------------------------------------------

#: ``obj._x`` outside ``obj``'s own class, allowed: "file" (whole file) or "file:expr".
PRIVATE_ALLOWLIST: dict[str, str] = {
    # transport: classes of one module that form one device, friends by design
    "transport/rdma/softqp.py": "the emulated CQs and QPs are one NIC's queues in one module; "
                                "they share their private queues as hardware does",
    "transport/rdma/pyverbs_provider.py": "wraps pyverbs CQ objects it created itself",
    # the standard library's and multiprocess's own underscore names
    "pool/supervisor/arbiter.py:p.proc._popen": "multiprocess keeps the exit status in "
                                                 "Popen.returncode; the reaper stores it there "
                                                 "(see 'Reaping' in the module doc)",
    "pool/worker/process.py:os._exit": "leave a forked child without running the parent's cleanup",
    "tools/bench/common.py:os._exit": "leave a forked child without running the parent's cleanup",
}


def _private_reaches(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or (attr.startswith("__") and attr.endswith("__")):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        yield node.lineno, ast.unparse(node)


def test_no_private_reach() -> None:
    problems = []
    used: set[str] = set()
    for package in PROJECT:
        for f in sorted((ROOT / package).rglob("*.py")):
            rel = str(f.relative_to(ROOT))
            for lineno, expr in _private_reaches(ast.parse(f.read_text(encoding="utf-8"))):
                for key in (rel, f"{rel}:{expr}"):
                    if key in PRIVATE_ALLOWLIST:
                        used.add(key)
                        break
                else:
                    problems.append(f"{rel}:{lineno}: {expr}")
    assert problems == [], "reaches into another object's private members"
    assert set(PRIVATE_ALLOWLIST) - used == set(), "allowlist entries that match nothing: delete them"


def test_private_reach_checker() -> None:
    src = "class A:\n    def f(self, o):\n        return self._x, cls._y, o._z, o.__len__\n"
    assert [e for _, e in _private_reaches(ast.parse(src))] == ["o._z"]

