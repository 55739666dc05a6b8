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
# Triton beside the venv, not in it (the CPU suite runs as users without Triton have it): the kernels' interpreter
# tests (TRITON_INTERPRET=1 in a subprocess) find it through MOE_FX_TRITON_PATH; without it they skip.
TRITON_DIR="${MOE_FX_TRITON_DIR:-$PWD/.triton-interpreter}"
if [ ! -f "$TRITON_DIR/triton/__init__.py" ]; then
    .venv/bin/python -m pip install -q --no-deps --target "$TRITON_DIR" "triton==3.9.0" >/dev/null 2>&1 \
        || echo "triton==3.9.0 could not be installed: the interpreter tests skip"
fi
export MOE_FX_TRITON_PATH="$TRITON_DIR"
exec .venv/bin/python -m pytest -q -n "${MOE_FX_TEST_WORKERS:-2}" --dist loadfile "$@"
