"""The dependency direction as a test (issue 19 item 2): ``lint-imports`` checks the contracts of ``pyproject.toml``
(``[tool.importlinter]``) over every import in ml_backend, those inside functions included: the layers contract
(docs/architecture.md's one-way flow: a new back-edge, or a new top-level part of ml_backend in no layer, fails here)
and the forbidden contract that keeps the Label Studio client and SDK behind ``ml_backend.labelstudio`` (issue 19
item 1: the product's paths use ``ProjectData``, the tools ``labelstudio/api.py``)."""

from __future__ import annotations

import ast
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


def _function_level_project_imports() -> list[str]:
    """Every import of an ml_backend module inside a function (absolute, or relative: all of ml_backend is the
    project) whose lines carry no ``# local: <reason>`` comment, as ``path:line: statement``."""
    found = []
    for path in sorted((REPO_ROOT / "ml_backend").rglob("*.py")):
        lines = path.read_text().splitlines()
        todo: list[tuple[ast.AST, bool]] = [(ast.parse("\n".join(lines), str(path)), False)]
        while todo:
            node, in_function = todo.pop()
            for child in ast.iter_child_nodes(node):
                if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                    if isinstance(child, ast.ImportFrom):
                        project = child.level > 0 or (child.module or "").split(".")[0] == "ml_backend"
                    else:
                        project = any(alias.name.split(".")[0] == "ml_backend" for alias in child.names)
                    text = lines[child.lineno - 1 : child.end_lineno]
                    if project and not any("# local:" in line for line in text):
                        found.append(f"{path.relative_to(REPO_ROOT)}:{child.lineno}: {text[0].strip()}")
                inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                todo.append((child, inner))
    return sorted(found)


def test_project_imports_sit_at_module_level():
    """Issue 19 item 2: an import of an ml_backend module inside a function hides a cycle from the reader, so it moves
    to module level; the only ones kept say why on their line (``# local: <reason>``: the module would make a light
    entry point load torch or rq, docs/architecture.md). Third-party imports are not checked here."""
    found = _function_level_project_imports()
    assert not found, "ml_backend imports inside functions without a '# local: <reason>' comment:\n" + "\n".join(found)


def test_light_entry_points_stay_light():
    """What the ``# local:`` imports protect: settings, the console script's parser (every ``ml-backend`` command),
    ``ml-backend import`` and the model registry the CLI reads load neither torch nor rq/redis."""
    code = (
        "import sys\n"
        "import ml_backend.config, ml_backend.cli, ml_backend.cli.importing, ml_backend.store.registry\n"
        "print(sorted(m for m in ('torch', 'rq', 'redis') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
