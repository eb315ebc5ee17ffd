"""End to end, failures: a checkpoint missing a tensor, an unknown option, a dead rank, a dead
front (no rank may outlive it)."""

from __future__ import annotations

import os
import signal

import pytest
from workers_testutil import PROMPT, poll, start_server, wait_until_up

pytestmark = pytest.mark.slow


def test_checkpoint_missing_a_tensor_fails_to_start_naming_it(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    src, _ = checkpoints["qwen3"]
    dst = tmp_path / "broken"
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    server = start_server(dst, "--tp", "2", "--device", "cpu", log=tmp_path / "broken.log")
    try:
        rc = server.proc.wait(120)
    finally:
        server.stop()
    assert rc != 0
    assert "model.layers.1.mlp.down_proj.weight" in server.output()
    assert "failed to start" in server.output()


def test_dead_rank_makes_health_503_and_ranks_die_with_the_front(checkpoints, tmp_path):
    path, _ = checkpoints["qwen3"]
    server = start_server(
        path, "--tp", "2", "--device", "cpu", "--dtype", "float32", log=tmp_path / "s.log"
    )
    try:
        wait_until_up(server)
        pids = [
            x["pid"] for x in server.post("/collective_rpc", {"method": "ping"}).json()["results"]
        ]
        os.kill(pids[1], signal.SIGKILL)
        poll(lambda: server.get("/health").status_code == 503, 30, "health to turn 503")
        health = server.get("/health").json()
        assert health["status"] == "rank_dead" and "[1]" in health["detail"]
        r = server.post("/generate", {"input_ids": PROMPT})
        assert r.status_code == 503 and "rank(s) [1]" in r.json()["message"]
        # Kill only the front, hard: the surviving rank must not outlive it.
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)
        poll(lambda: not _alive(pids[0]), 30, "rank 0 to exit after its front died")
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_unknown_option_is_rejected(checkpoints, tmp_path):
    path, _ = checkpoints["qwen3"]
    server = start_server(path, "--tensor-parallel", "2", log=tmp_path / "opt.log")
    try:
        rc = server.proc.wait(60)
    finally:
        server.stop()
    assert rc == 2 and "unrecognized arguments: --tensor-parallel" in server.output()
