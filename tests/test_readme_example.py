"""The README's asyncio example, extracted from README.md and run against a real pool,
so it cannot rot: the block is saved as ``hello.py``, served with ``msgr serve --loop
asyncio --app hello:handler`` and called by running it as a script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pool.support import running_pool

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- asyncio-example[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its asyncio example block"
    return m.group(1)


def test_readme_asyncio_example_runs_against_a_pool(tmp_path: Path) -> None:
    code = readme_example()
    assert len(code.splitlines()) <= 25
    (tmp_path / "hello.py").write_text(code)
    path = os.pathsep.join([str(tmp_path), str(ROOT)])
    with running_pool(tmp_path, 2, app="hello:handler", extra=("--loop", "asyncio"),
                      env={"PYTHONPATH": path}) as pool:
        r = subprocess.run([sys.executable, str(tmp_path / "hello.py"),
                            f"127.0.0.1:{pool.port}"], capture_output=True, text=True,
                           timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": path},
                           check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "{'hello': 'n0'} 100"
