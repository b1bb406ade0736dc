#!/usr/bin/env bash
# The main job: installs what it needs, then runs the whole annotation loop (see scripts/quickstart.py --help).
#   bash scripts/quickstart.sh                        # generated EM-like tiles, simulated first batch
#   bash scripts/quickstart.sh --data STACK [--masks MASKS]   # real data (multi-page TIFF or folder of slices)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/bootstrap.sh
exec "$VENV/bin/python" scripts/quickstart.py "$@"
