#!/usr/bin/env bash
# The project's test command: installs what it needs, lints, then runs the whole suite
# (unit, real Redis, real RQ worker, real Label Studio 1.23.2 in its own cached venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/bootstrap.sh
"$VENV/bin/ruff" check ml_backend scripts tests
bash scripts/install_chromium.sh  # Debian chromium for tests/browser (skipped with a message where missing)
exec "$VENV/bin/python" -m pytest -ra "$@"
