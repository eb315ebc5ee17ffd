"""The GPU probes' CPU modes, so that their code paths stay runnable: the fork end to end (gloo),
the fork transfer backend alone (gloo), and the register probes without pinning."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(script: str, *args: str, timeout: float) -> str:
    cmd = [sys.executable, str(REPO / "bench" / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(120)
def test_fork_link_gloo_moves_every_tensor_exactly():
    out = run("fork_link.py", "--backend", "gloo", "--count", "4", "--mib", "2", timeout=110)
    assert "gloo: 4 x 2 MiB" in out and "every tensor exact" in out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fork_bench_cpu_small_verifies_the_fork(tmp_path):
    """A TP=2 client of the TP=1 seed: slice mode, about half the checkpoint per link."""
    ckpt = str(tmp_path / "ckpt")
    out = run("fork.py", "--cpu", "--small", "--client-tp", "2", "--dir", ckpt, timeout=170)
    assert "fork (CPU, gloo): transfer (client: send call to last byte)" in out
    assert "fork: seed's send (first tensor to all flushed)" in out
    assert "sha256 of" in out and "/generate match" in out
    links = re.findall(
        r"\| seed rank 0 -> client rank (\d) \(slice mode\) \| (\d+) \| ([\d.]+)%", out
    )
    assert [j for j, _, _ in links] == ["0", "1"], out
    assert all(45 < float(share) < 60 for _, _, share in links), links


@pytest.mark.timeout(120)
def test_register_probe_without_pinning(tmp_path):
    out = run(
        "register.py",
        "--gib",
        "0.05",
        "--pin",
        "none",
        "--threads",
        "2",
        "--dir",
        str(tmp_path),
        timeout=110,
    )
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    variants = {line.split("|")[1].strip() for line in rows[1:]}
    assert {"in_place", "in_place_populated", "anon_4k", "anon_thp", "anon_thp_whole"} <= variants
    assert list(tmp_path.iterdir()) == []  # the probe's files are removed


@pytest.mark.timeout(120)
def test_register_named_probe_without_pinning():
    out = run(
        "register_named.py",
        *("--tensors", "300", "--kib", "4", "--threads", "2", "--no-pin"),
        timeout=110,
    )
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    heads = {line.split("|")[1].strip() for line in rows}
    # three methods (auto, writev, memmove) x beside on/off x first/pool reused
    assert len(rows) == 12 and all(line.rstrip().endswith("True |") for line in rows), out
    assert {"auto, True, first", "memmove, False, pool reused"} <= heads
