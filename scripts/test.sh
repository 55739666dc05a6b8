#!/usr/bin/env bash
# Install (scripts/setup.sh), lint (ruff, configured in pyproject.toml) and run the test suite. Extra arguments go to pytest.
# The suite runs in MOE_FX_TEST_WORKERS processes (pytest-xdist; default 2, CI's cores), a test file to a process,
# each with one torch thread: most tests are small models whose time is Python, which a second thread barely helps
# (18 min in one process on 2 cores, 12 in two). `-n 0` as an extra argument runs in this process (a debugger).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet . || { echo "ruff: lint errors above (ruff check --fix . repairs most)"; exit 1; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -n "${MOE_FX_TEST_WORKERS:-2}" --dist loadfile "$@"
