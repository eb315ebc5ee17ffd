"""ckpt_engine.progress: which mode each rank gets, the log lines, the bar, and a registration
reporting through it."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from safetensors.torch import save_file

from ckpt_engine import ParameterServer
from ckpt_engine.progress import Progress, resolve_mode


@pytest.mark.parametrize(
    "mode, rank, isatty, expected",
    [
        (None, 0, True, "bar"),
        (None, 0, False, "log"),
        ("auto", 0, True, "bar"),
        ("auto", 1, True, "off"),
        ("log", 0, True, "log"),
        ("bar", 0, False, "bar"),
        ("bar", 3, False, "off"),
        ("off", 0, True, "off"),
    ],
)
def test_resolve_mode(mode, rank, isatty, expected, monkeypatch):
    monkeypatch.delenv("CKPT_ENGINE_PROGRESS", raising=False)
    assert resolve_mode(mode, rank=rank, isatty=isatty) == expected


def test_mode_from_the_environment_and_bad_values(monkeypatch):
    monkeypatch.setenv("CKPT_ENGINE_PROGRESS", "off")
    assert resolve_mode(None, rank=0, isatty=True) == "off"
    assert resolve_mode("log", rank=0, isatty=True) == "log"  # explicit wins
    monkeypatch.setenv("CKPT_ENGINE_PROGRESS", "loud")
    with pytest.raises(ValueError, match="progress mode 'loud': supported: auto, bar, log, off"):
        resolve_mode(None, rank=0, isatty=True)
    monkeypatch.setenv("CKPT_ENGINE_PROGRESS_INTERVAL_S", "soon")
    with pytest.raises(ValueError, match="CKPT_ENGINE_PROGRESS_INTERVAL_S"):
        Progress("x", 1, rank=0, mode="log")
    monkeypatch.delenv("CKPT_ENGINE_PROGRESS_INTERVAL_S")
    with pytest.raises(ValueError, match="positive"):
        Progress("x", 1, rank=0, mode="log", interval_s=0)


def test_log_lines_from_several_threads(caplog):
    caplog.set_level(logging.INFO, logger="ckpt_engine.progress")
    total = 8 * 1000 * 4_000_000
    with Progress("register 'ckpt'", total, rank=0, mode="log", interval_s=1e-9) as p:
        threads = [
            threading.Thread(target=lambda: [p.advance(4_000_000) for _ in range(1000)])
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert p.done == total
    lines = [r.getMessage() for r in caplog.records if r.name == "ckpt_engine.progress"]
    assert lines and all(line.startswith("register 'ckpt': ") for line in lines)
    assert " of 32.0 GB (" in lines[0] and "GB/s" in lines[0]
    assert "about" in lines[0] and "s left" in lines[0]
    assert p.line(p._start + 1).startswith("register 'ckpt': 32.0 of 32.0 GB (100%), 32.00 GB/s")


def test_no_lines_within_one_interval_nor_on_other_ranks(caplog):
    caplog.set_level(logging.INFO, logger="ckpt_engine.progress")
    with Progress("quick", 100, rank=0, mode="log", interval_s=3600) as p:
        p.advance(100)
    with Progress("other rank", 100, rank=1, mode="log", interval_s=1e-9) as q:
        q.advance(100)
    assert p.done == 100 and q.done == 0 and q.mode == "off"
    assert not [r for r in caplog.records if r.name == "ckpt_engine.progress"]


def test_bar_counts_and_closes():
    p = Progress("pull", 10, rank=0, mode="bar")
    p.advance(4)
    p.advance(6)
    assert p._bar.n == 10 and p._bar.total == 10
    p.close()
    assert p._bar is None
    p.close()  # twice is harmless


def test_registration_reports_progress(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CKPT_ENGINE_PROGRESS", "log")
    monkeypatch.setenv("CKPT_ENGINE_PROGRESS_INTERVAL_S", "1e-9")
    (tmp_path / "shm").mkdir()
    monkeypatch.setenv("CKPT_ENGINE_SHM_DIR", str(tmp_path / "shm"))  # files are read, not mapped
    caplog.set_level(logging.INFO, logger="ckpt_engine.progress")
    files = []
    for i in range(3):
        save_file({f"w{i}": torch.ones(1024, 256)}, tmp_path / f"{i}.safetensors")
        files.append(str(tmp_path / f"{i}.safetensors"))
    ps = ParameterServer(rank=0, world_size=1, device_type="cpu")
    try:
        ps.register_checkpoint("big", files=files)
        ps.register_checkpoint("named", named_tensors={"x": torch.ones(1024, 256)})
    finally:
        ps.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "ckpt_engine.progress"]
    big = [line for line in lines if line.startswith("register 'big': ")]
    assert big and big[-1].startswith("register 'big': 0.0 of 0.0 GB (100%)")
    assert any(line.startswith("register 'named': 0.0 of 0.0 GB (100%)") for line in lines)
