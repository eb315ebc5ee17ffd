"""End to end, P2P join (issue 9): job A (`torchrun` 2 ranks, examples/update.py) registers a
checkpoint, saves its metas and stays up serving its host memory; job B (2 new ranks) joins with
`--load-metas-file --update-method p2p` and fills a fresh reference server (`--tp 2 --load-format
dummy --wait-for-initial-weights`), whose /weights_info then equals a disk-loaded server's. The
same with the metas published to and found in a real Redis (`--metas-registry`), job B started
before job A publishes them, both jobs on the Mooncake transport (named, so over its TCP
protocol here): new ranks read the owners' memory one-sided. Either way each new rank reads
only the rows its TP rank keeps (half of every sharded tensor, counted in bytes).
(Refused tokens and owners killed mid-pull: tests/ckpt_engine/test_p2p_update.py.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
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

pytestmark = pytest.mark.slow

COMMON = ["--inference-parallel-size", "2", "--api-key", "secret", "--device", "cpu"]
PROGRESS_LINES = {"CKPT_ENGINE_PROGRESS": "log", "CKPT_ENGINE_PROGRESS_INTERVAL_S": "1e-9"}


def updater(*args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    return start_updater(*COMMON, *args, nproc=2, log=log, env=env)


@pytest.mark.parametrize("through", ["file", "registry"])
def test_new_instance_joins_over_p2p(tmp_path, through, request):
    ckpt = save_checkpoint(make_hf_model("qwen3", seed=5), tmp_path / "ckpt", tokenizer=True)
    common = ["--tp", "2", "--device", "cpu", "--api-key", "secret"]
    disk = start_server(ckpt, *common, log=tmp_path / "disk.log")
    new = start_server(
        ckpt, *common, "--load-format", "dummy", "--wait-for-initial-weights",
        log=tmp_path / "new.log",
    )  # fmt: skip
    metas = tmp_path / "metas.json"
    report = tmp_path / "B.jsonl"
    procs = []
    try:
        wait_until_up(disk)
        wait_until_up(new)
        if through == "file":
            owners = updater(
                "--checkpoint-path", str(ckpt), "--endpoint", disk.url,
                "--save-metas-file", str(metas), "--sleep-time", "600", log=tmp_path / "A.log",
            )  # fmt: skip
            procs.append(owners)
            poll(lambda: metas.exists() or owners.poll() is not None, 120, "job A's metas file")
            assert owners.poll() is None, (tmp_path / "A.log").read_text()
            assert metas.stat().st_mode & 0o777 == 0o600
            joiner = updater(
                "--load-metas-file", str(metas), "--update-method", "p2p", "--endpoint", new.url,
                "--timeout", "60", "--json-out", str(report), log=tmp_path / "B.log",
                env=PROGRESS_LINES,
            )  # fmt: skip
            procs.append(joiner)
        else:  # B waits for the metas A publishes in Redis; both over Mooncake
            url = request.getfixturevalue("redis_server").url
            mooncake = {
                "CKPT_ENGINE_P2P_TRANSPORT": "mooncake",
                "CKPT_ENGINE_MOONCAKE_PROTOCOL": "tcp",
            }
            joiner = updater(
                "--metas-registry", url, "--find-metas", "job-a", "--update-method", "p2p",
                "--endpoint", new.url, "--timeout", "60", "--ready-timeout", "150",
                "--json-out", str(report), log=tmp_path / "B.log",
                env=mooncake,
            )  # fmt: skip
            procs.append(joiner)
            owners = updater(
                "--checkpoint-path", str(ckpt), "--endpoint", disk.url, "--metas-registry", url,
                "--publish-metas", "job-a", "--sleep-time", "600", log=tmp_path / "A.log",
                env=mooncake,
            )  # fmt: skip
            procs.append(owners)
        assert joiner.wait(timeout=240) == 0, (tmp_path / "B.log").read_text()
        assert "GB/s" in (tmp_path / "B.log").read_text()
        if through == "file":  # rank 0 logged the pull's progress (not a terminal: lines)
            assert "p2p pull 'my-checkpoint-iter-0': " in (tmp_path / "B.log").read_text()
        assert owners.poll() is None  # A still serving
        assert new.get("/health").status_code == 200
        got, want = (
            new.get("/weights_info", headers=KEY).json(),
            disk.get("/weights_info", headers=KEY).json(),
        )
        assert got["status"] == "ready"
        assert got["tensors"] == want["tensors"] and got["checksum"] == want["checksum"]
        read = {r["rank"]: (r["p2p_read_bytes"], r["p2p_sharded"]) for r in _records(report)}
        total, kept, spans = _checkpoint_bytes(ckpt)
        # each rank read only the rows its TP rank keeps: half of every sharded tensor (Mooncake:
        # column shards of short runs as their whole span, one piece)
        want = kept if through == "file" else spans
        assert read == {0: (want, True), 1: (want, True)}, (read, total)
        assert kept < 0.55 * total and spans < total
    finally:
        for proc in procs:
            stop_group(proc)
        disk.stop()
        new.stop()
    if through == "registry":
        # the owners served Mooncake only (named), and withdrew their metas when they stopped
        assert "mooncake transfer engine on 127.0.0.1:" in (tmp_path / "A.log").read_text()
        from ckpt_engine.registry.redis_store import RedisRegistry

        registry = RedisRegistry(request.getfixturevalue("redis_server").url)
        assert registry.get_document("p2p-metas/job-a") is None


def _records(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _checkpoint_bytes(ckpt: Path) -> tuple[int, int, int]:
    """(all bytes, bytes one rank of TP=2 reads when it reads only its rows, the same where
    column shards are read as their span): every 2-D tensor halved (rows of q/k/v, gate/up,
    embedding, LM head; columns of o_proj, down_proj: all but half a row as a span), norms
    whole."""
    from safetensors.torch import load_file

    total = kept = spans = 0
    for path in ckpt.glob("*.safetensors"):
        for name, t in load_file(path).items():
            total += t.nbytes
            kept += t.nbytes if t.dim() == 1 else t.nbytes // 2
            column = ".o_proj." in name or ".down_proj." in name
            half_row = t.nbytes // t.shape[0] // 2 if column else 0
            spans += (
                t.nbytes - half_row if column else (t.nbytes if t.dim() == 1 else t.nbytes // 2)
            )
    return total, kept, spans
