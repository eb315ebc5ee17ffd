#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh) and ./.venv-vllm (scripts/setup_vllm.sh: vLLM's CPU build, which
# the tests in tests/engines start as real servers), lint, then run the CPU test suite (GPU tests
# are skipped). CKPT_ENGINE_REQUIRE_VLLM=1 makes the vLLM tests fail, not skip, without their venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export CKPT_ENGINE_REQUIRE_VLLM=1
exec .venv/bin/python -m pytest -m "not gpu" "$@"
