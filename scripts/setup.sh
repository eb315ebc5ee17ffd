#!/usr/bin/env bash
# Create ./.venv and install ckpt-engine with its test extras.
#
# torch: on a machine without an NVIDIA GPU we install the CPU build (a few hundred MB instead of
# several GB of CUDA libraries). We first ask the configured package indexes for the pinned
# `torch==2.13.0+cpu`; where they do not carry CPU builds (plain PyPI), we take it from the PyTorch
# CPU index. With a GPU (nvidia-smi present) the regular PyPI build is used.
# Override with CKPT_ENGINE_TORCH_SPEC (e.g. "torch==2.11.0") if you need another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup_system.sh  # redis-server, libibverbs1 (Debian packages, when missing)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${CKPT_ENGINE_TORCH_SPEC:-}" ]; then
    "$VPY" -m pip install -q "$CKPT_ENGINE_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch==2.13.0"
  else
    "$VPY" -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
      || "$VPY" -m pip install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$VPY" -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored: it is neither" || true
"$VPY" -c "import ckpt_engine, workers, torch, zmq, fastapi; print('ckpt-engine ready, torch', torch.__version__)"
