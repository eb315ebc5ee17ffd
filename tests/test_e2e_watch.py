"""End to end: `torchrun --nproc-per-node 2 examples/update.py --watch DIR` stays up and pushes
the checkpoints a "trainer" (this test) writes into DIR, into a reference server (`--tp 2
--load-format dummy --wait-for-initial-weights`), on CPU.

One watcher per register mode (overlap: one pass; separate: register, gather, update), one
server, in phases; each phase waits on observable state (the server's
/weights_info version and checksum, the watcher's log and --json-out lines), never on sleeps:
1. step-01 and step-02 complete before the watcher starts: step-02 is served, step-01 skipped
   as superseded;
2. step-03 written: served bit-exact;
3. step-04 written without its COMPLETE marker: not pushed (the watcher says it waits); the
   marker written: served;
4. step-05 complete but its file truncated: refused naming the file, step-04 stays served;
5. step-06 written: served; the watcher exits 0 (--watch-max-updates 4).
Then the --json-out lines: pushes in order, seconds per push, pool memory flat.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from workers_testutil import (
    KEY,
    make_hf_model,
    poll,
    save_checkpoint,
    start_server,
    start_updater,
    stop_group,
    wait_until_up,
)

from workers.models.weights import combined_digest, tensor_digest

pytestmark = pytest.mark.slow

DEADLINE_S = 120  # for each observable change (an update of a tiny model takes seconds)


def write_step(root: Path, name: str, state: dict, *, complete: bool = True) -> Path:
    """A checkpoint as a trainer writes it: the files, then the marker last."""
    folder = root / name
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    if complete:
        (folder / "COMPLETE").touch()
    return folder


def digest(state: dict) -> str:
    return combined_digest({n: tensor_digest(t) for n, t in state.items()})


class Watcher:
    """The updater process (its own session), its log, its --json-out lines."""

    def __init__(self, url: str, directory: Path, tmp: Path, register_mode: str) -> None:
        self.log, self.json_out = tmp / "watch.log", tmp / "watch.jsonl"
        cmd = ["--watch", str(directory), "--watch-interval", "0.2", "--watch-max-updates", "4"]
        cmd += ["--endpoint", url, "--device", "cpu", "--inference-parallel-size", "2"]
        cmd += ["--api-key", "secret", "--inference-api", "update_weights_from_ipc"]
        cmd += ["--register-mode", register_mode, "--timeout", "120"]
        cmd += ["--json-out", str(self.json_out)]
        self.proc = start_updater(*cmd, nproc=2, log=self.log)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[dict]:
        if not self.json_out.exists():
            return []
        return [json.loads(line) for line in self.json_out.read_text().splitlines()]

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"watcher exited ({self.proc.returncode}):\n{self.output()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("watch-server")
    model = make_hf_model("qwen3", seed=0)
    path = save_checkpoint(model, tmp_path / "model")
    args = ["--tp", "2", "--device", "cpu", "--dtype", "float32", "--api-key", "secret"]
    args += ["--load-format", "dummy", "--wait-for-initial-weights"]
    srv = start_server(path, *args, log=tmp_path / "server.log")
    try:
        wait_until_up(srv)
        yield srv, load_file(str(path / "model.safetensors"))
    finally:
        srv.stop()


@pytest.mark.parametrize("register_mode", ["overlap", "separate"])
def test_watch_pushes_each_complete_checkpoint_in_order(server, tmp_path, register_mode):
    srv, base = server
    steps = {k: {n: t + 0.01 * k for n, t in base.items()} for k in range(1, 7)}
    root = tmp_path / "ckpts"
    root.mkdir()

    def served() -> dict:
        return srv.get("/weights_info", headers=KEY).json()

    def until_served(name: str, k: int) -> None:
        def check():
            watcher.alive()
            info = served()
            return info["weight_version"] == name and info["status"] == "ready" and info

        info = poll(check, DEADLINE_S, f"{name} served")
        assert info["checksum"] == digest(steps[k]), f"{name} not bit-exact"

    write_step(root, "step-01", steps[1])
    write_step(root, "step-02", steps[2])
    watcher = Watcher(srv.url, root, tmp_path, register_mode)
    try:
        until_served("step-02", 2)  # 1: the newest complete one; step-01 superseded
        assert "skipping step-01: superseded by step-02" in watcher.output()

        write_step(root, "step-03", steps[3])  # 2
        until_served("step-03", 3)

        write_step(root, "step-04", steps[4], complete=False)  # 3: files, no marker
        poll(lambda: "step-04 is not complete yet" in watcher.output(), DEADLINE_S, "step-04 seen")
        assert served()["weight_version"] == "step-03"  # seen, and not pushed
        (root / "step-04" / "COMPLETE").touch()
        until_served("step-04", 4)

        bad = write_step(root, "step-05", steps[5], complete=False)  # 4: cut short
        file = bad / "model.safetensors"
        os.truncate(file, file.stat().st_size - 100)
        (bad / "COMPLETE").touch()
        refused = poll(
            lambda: [r for r in watcher.lines() if r["checkpoint_name"] == "step-05"],
            DEADLINE_S,
            "step-05 refused",
        )
        assert refused[0]["result"] == "failed" and str(file) in refused[0]["error"]
        assert refused[0]["update_phases"] == {}  # its update never ran (not step-04's phases)
        info = served()
        assert info["weight_version"] == "step-04" and info["checksum"] == digest(steps[4])
        assert srv.get("/health").status_code == 200

        write_step(root, "step-06", steps[6])  # 5
        until_served("step-06", 6)
        watcher.proc.wait(DEADLINE_S)  # --watch-max-updates 4: step-02, -03, -04, -06
    finally:
        stop_group(watcher.proc)
    out = watcher.output()
    assert watcher.proc.returncode == 0, out
    assert "refused step-05" in out and "--watch-max-updates 4 reached" in out

    lines = watcher.lines()
    for rank in (0, 1):
        mine = [r for r in lines if r["rank"] == rank]
        assert [r["checkpoint_name"] for r in mine] == [
            "step-02", "step-03", "step-04", "step-05", "step-06"
        ]  # fmt: skip
        ok = [r for r in mine if r["result"] == "ok"]
        assert [r["weight_version"] for r in ok] == ["step-02", "step-03", "step-04", "step-06"]
        assert ok[0]["watch"]["skipped"] == ["step-01"]
        assert all(r["push_seconds"] > 0 and r["seconds"]["update"] > 0 for r in ok)
        # marker to applied >= the push (less the filesystem clock's coarseness)
        assert all(r["since_complete_seconds"] >= r["push_seconds"] - 0.05 for r in ok)
        # same-size checkpoints: the first push's buffers, reused; nothing allocated after it
        held = {r["pool"]["held_bytes"] for r in ok}
        allocated = {r["pool"]["allocated_bytes"] for r in mine}
        assert held == allocated and len(held) == 1 and held.pop() >= ok[0]["rank_bytes"] > 0
        assert ok[-1]["pool"]["buffers_reused"] >= 3
