#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh), then run the end-to-end demo (python -m workers.demo):
# a small random model checkpoint, the reference server with dummy weights waiting for its initial
# weights, the torchrun updater pushing the checkpoint into it, verification, and a timing table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m workers.demo "$@"
