"""The style is enforced, not suggested: `ruff check` (line length 110, complexity 12, imports, bugbear) and
`ruff format --check` pass on zoo/ and tests/, as `make lint` runs them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff() -> str:
    found = Path(sys.executable).parent / "ruff"
    if found.exists():
        return str(found)
    path = shutil.which("ruff")
    if path is None:
        pytest.fail(
            "ruff is not installed: `make test` installs it with the dev extra (pip install '.[dev]')"
        )
    return path


@pytest.mark.parametrize("args", [["check", "zoo", "tests"], ["format", "--check", "zoo", "tests"]])
def test_ruff(args):
    result = subprocess.run([ruff(), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
