"""The README's first command (`bash scripts/demo.sh` runs `python -m workers.demo`): it must
push a checkpoint end to end, verify it and print its table, then leave no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]
)
def test_demo_runs_end_to_end(device):
    import torch

    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.demo", "--device", device, "--timeout", "120"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the demo did not finish in 240 s:\n{out}")
    assert proc.returncode == 0, out
    for row in ("register", "gather", "update", "GB/s", "sha256 equal", "transformers greedy"):
        assert row in out, out
    # Nothing the demo started outlives it (the server and the updater name its work folder).
    work = next(line.split()[-1] for line in out.splitlines() if "work folder" in line)
    alive = subprocess.run(["pgrep", "-f", work], capture_output=True, text=True)
    assert alive.stdout.strip() == "", alive.stdout
