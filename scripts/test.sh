#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh), lint, then run the CPU test suite (GPU tests are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -m "not gpu" "$@"
