#!/usr/bin/env bash
# Build the documentation site (MkDocs + Material + mkdocstrings) with every warning an error; the CLI
# reference is generated from the argument parser (docs/hooks/cli_reference.py). `bash scripts/docs.sh serve`
# serves it with live reload instead. Installs the docs extra into .venv (scripts/setup.sh first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
.venv/bin/python -m pip install -q -e ".[docs]" -c constraints.txt 2>&1 | grep -v "^WARNING: Location" || true
export NO_MKDOCS_2_WARNING=1
if [ "${1:-build}" = serve ]; then
    exec .venv/bin/mkdocs serve
fi
exec .venv/bin/mkdocs build --strict --site-dir "${MOE_FX_SITE:-build/site}"
