"""bench/watch.py's CPU mode: the watching updater (a process, stopped by SIGTERM) and the
trainer pattern (in process), every step's bytes checked by the worker, the table and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_bench_watch_cpu(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "watch.py"), "--cpu", "--gib", "0.01"]
    cmd += ["--shrink", "16", "--steps", "2", "--data-dir", str(tmp_path), "--limit-s", "130"]
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=140, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the updater exited 143 on SIGTERM" in proc.stdout
    assert "| watch |" in proc.stdout and "| trainer |" in proc.stdout
    results = json.loads((tmp_path / "watch.json").read_text())["results"]
    for mode in ("watch", "trainer"):
        assert [s["step"] for s in results[mode]] == [1, 2]
        assert all(s["exact"] and s["seconds"] > 0 for s in results[mode])
    assert all(s["push_seconds"] > 0 for s in results["watch"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ckpt-engine-bench-watch")]
