"""bench/p2p.py's CPU smoke mode runs, verifies every byte, and prints its table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_cpu_mode(capsys, tmp_path):
    sys.path.insert(0, str(REPO))
    from bench import p2p

    results = tmp_path / "RESULTS.md"
    assert p2p.main(["--cpu", "--streams", "2", "--repeat", "1", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| tcp | 2 |" in out
    assert "| tcp, column shard (runs of 12288 B of rows twice that) | 1 |" in out  # verified
    assert "## P2P transport" in results.read_text()
