#!/usr/bin/env bash
# Create .venv (if missing) and install moe-fx with its test and onnx extras. torch is installed first and pinned,
# so pip takes the local CPU wheel instead of pulling a multi-GB CUDA build; set MOE_FX_TORCH to override
# (e.g. MOE_FX_TORCH="torch" to keep the newest, or an already-installed GPU torch's version).
# transformers is pinned by constraints.txt to the version the tests are written against.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MOE_FX_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "${MOE_FX_TORCH:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
# constraints.txt pins the transformers version the tests are written against (MOE_FX_CONSTRAINTS="" to lift it)
constraints=(-c "${MOE_FX_CONSTRAINTS-constraints.txt}")
[ -n "${MOE_FX_CONSTRAINTS-constraints.txt}" ] || constraints=()
# PYTHONWARNINGS reaches the build backend: setuptools' notice about editable installs is not for our users
PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install -q -e ".[test,onnx]" "${constraints[@]}" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import moe_fx, torch, transformers; print(f'moe-fx {moe_fx.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
