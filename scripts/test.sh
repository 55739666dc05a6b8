#!/usr/bin/env bash
# Install (scripts/setup.sh), lint (ruff, configured in pyproject.toml) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet . || { echo "ruff: lint errors above (ruff check --fix . repairs most)"; exit 1; }
exec .venv/bin/python -m pytest -q "$@"
