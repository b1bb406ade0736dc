"""The dependency direction as a test (issue 19 item 2): ``lint-imports`` checks the contracts of ``pyproject.toml``
(``[tool.importlinter]``) over every import in ml_backend, those inside functions included: the layers contract
(docs/architecture.md's one-way flow: a new back-edge, or a new top-level part of ml_backend in no layer, fails here)
and the forbidden contract that keeps the Label Studio client and SDK behind ``ml_backend.labelstudio`` (issue 19
item 1: the product's paths use ``ProjectData``, the tools ``labelstudio/api.py``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def lint_imports() -> str:
    beside = Path(sys.executable).parent / "lint-imports"  # the venv's own, as installed by the test extra
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]' (import-linter)")
    return found


def test_import_contracts_are_kept():
    result = subprocess.run([lint_imports(), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout, result.stdout
