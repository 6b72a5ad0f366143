"""``mypy --strict`` (the strictness is pyproject's ``[tool.mypy]``) stays clean on every
package of the project: a type error fails the suite, not only ``make typecheck``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_mypy_strict_is_clean(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
         "protocol", "transport", "pool", "tools"],
        cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, f"mypy --strict found problems:\n{r.stdout}{r.stderr}"
    assert "Success: no issues found" in r.stdout
