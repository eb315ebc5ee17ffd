"""Multi-process updates on CPU: real rank processes (torchrun-like environment, gloo), each
with its own worker process that checks every tensor bit-exactly; error injection."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 20.0
MiB = 1 << 20
SEED, BIG_BYTES, TINY = 1234, 100_000, 40  # the tensors of every rank (_tensors.rank_tensors)

pytestmark = pytest.mark.slow


def flat_then_failures(last_rank: int) -> list[dict]:
    return [
        {"op": "update", "step": "flat", "repeat": 10},
        {
            "op": "update",
            "step": "run_raises",
            "inject": {"kind": "fail_at", "rank": last_rank, "bucket": 2},
        },
        {"op": "update", "step": "after_raise"},
        {
            "op": "update",
            "step": "worker_killed",
            "inject": {"kind": "die_at", "rank": 0, "bucket": 1},
        },
        {"op": "respawn"},
        {"op": "update", "step": "after_kill"},
    ]


def named_steps(last_rank: int) -> list[dict]:
    """register_and_update of every rank's files and named tensors (on its device: the named
    ones go into the slots from there, ckpt_engine.ps.direct); once with a worker failing."""
    return [
        {"op": "register_and_update", "step": "pushed", "repeat": 2},
        {
            "op": "register_and_update",
            "step": "pushed_raises",
            "inject": {"kind": "fail_at", "rank": last_rank, "bucket": 2},
        },
        {"op": "update", "step": "after_pushed"},
    ]


def check_named_steps(records, ranks) -> None:
    for r in ranks:
        pushed = updates(records[r], "pushed")
        assert len(pushed) == 2 and all(u["ok"] for u in pushed), pushed
        assert all(u["host_exact"] and not u["pending_left"] for u in pushed), pushed
        assert all(u["direct"] for u in pushed), pushed
        assert not any(u["pushed_registered"] for u in pushed), pushed  # unregistered after
        (failed,) = updates(records[r], "pushed_raises")
        assert not failed["pushed_registered"], failed  # unregistered on every rank
        assert updates(records[r], "after_pushed")[0]["ok"], records[r]
    text = "injected failure at bucket 2"
    last = len(ranks) - 1
    assert_failed_everywhere(records, ranks, "pushed_raises", rank=last, bucket=2, text=text)


def check_flat_then_failures(records, ranks) -> None:
    sys.path.insert(0, str(HERE))
    import _tensors

    last = len(ranks) - 1
    held = len(_tensors.all_expected(SEED, len(ranks), big_bytes=BIG_BYTES, tiny=TINY))
    for r in ranks:
        reg = records[r][0]
        assert reg["op"] == "register" and reg["ok"] and reg["tensors"] == held, (reg, held)
        flat = updates(records[r], "flat")
        assert len(flat) == 10 and all(u["ok"] for u in flat), flat
        assert_flat([u["usage"] for u in flat], [u["worker"] for u in flat])
        for name in ("after_raise", "after_kill"):
            assert updates(records[r], name)[0]["ok"], (r, name, updates(records[r], name))
        assert records[r][-1] == {"op": "close", "ok": True, "leftover_shm": []}
    text = "injected failure at bucket 2"
    assert_failed_everywhere(records, ranks, "run_raises", rank=last, bucket=2, text=text)
    for r in ranks:  # every worker returned, told why
        worker = updates(records[r], "run_raises")[0]["worker"]
        assert (
            not worker["ok"]
            and "UpdateAborted" in worker["error"]
            and "bucket 2" in worker["error"]
        )
    # the rank sees the socket drop, or its req_func (waiting on that worker) fail first
    died = ("worker disconnected", "req_func raised EOFError")
    assert_failed_everywhere(records, ranks, "worker_killed", rank=0, bucket=1, text=died)
    for r in ranks:  # buckets went out: the servers may hold a mix, never reported untouched
        assert not updates(records[r], "run_raises")[0]["untouched"]
        assert not updates(records[r], "worker_killed")[0]["untouched"]


def run_ranks(
    tmp_path: Path,
    world: int,
    steps: list[dict],
    *,
    port: int,
    per_node: int,
    device: str = "cpu",
    limit_s: float = 240,
    wire: str = "ckpt-engine",
    host_prefix: str = "node",
):
    """Start ``world`` rank processes (``per_node`` per emulated host); return records, codes."""
    shm_data = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="ckpt-engine-test-"))
    spec = {
        "seed": SEED, "world_size": world, "big_bytes": BIG_BYTES, "tiny": TINY,
        "bucket_bytes": 64 * 1024, "timeout_s": TIMEOUT_S, "out_dir": str(tmp_path),
        "data_dir": str(tmp_path), "shm_data_dir": str(shm_data), "steps": steps, "wire": wire,
    }  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    procs, logs = [], []
    try:
        for rank in range(world):
            env = dict(
                os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % per_node),
                LOCAL_WORLD_SIZE=str(per_node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                CKPT_ENGINE_DEVICE=device, CKPT_ENGINE_HOSTNAME=f"{host_prefix}{rank // per_node}",
            )  # fmt: skip
            log = open(tmp_path / f"rank{rank}.log", "wb")  # noqa: SIM115
            logs.append(log)
            cmd = [sys.executable, str(HERE / "_ps_rank.py"), str(tmp_path / "spec.json")]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + limit_s
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for log in logs:
            log.close()
        shutil.rmtree(shm_data, ignore_errors=True)
    records = {}
    for rank in range(world):
        path = tmp_path / f"rank{rank}.json"
        records[rank] = json.loads(path.read_text()) if path.exists() else []
        if records[rank]:  # a killed rank cannot clean up after itself: do it for it
            remove_leftovers(records[rank][0]["run_id"])
    return records, [p.returncode for p in procs]


def remove_leftovers(run_id: str) -> None:
    prefix = f"ckpt-engine-{run_id}-"
    for name in os.listdir("/dev/shm"):
        if name.startswith(prefix):
            os.unlink(os.path.join("/dev/shm", name))
    for name in os.listdir(tempfile.gettempdir()):
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(tempfile.gettempdir(), name), ignore_errors=True)


def logs(tmp_path: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted(tmp_path.glob("rank*.log"))
    )


def updates(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r.get("op") == "update" and r.get("step") == name]


def assert_flat(ps_usage: list[dict], worker_usage: list[dict]) -> None:
    """No growth over repeated updates: fds, RSS, shared-memory files, sockets, device memory."""
    for usage in (ps_usage, worker_usage):
        assert len({u["fds"] for u in usage}) == 1, [u["fds"] for u in usage]
        assert usage[-1]["rss"] - usage[0]["rss"] < 32 * MiB, [u["rss"] for u in usage]
    assert {u["shm"] for u in ps_usage} == {ps_usage[0]["shm"]}  # only the registered buffers
    assert {u["sockets"] for u in ps_usage} == {0}
    assert {u["device"] for u in ps_usage} == {ps_usage[0]["device"]}  # IPC buffers freed


def assert_failed_everywhere(records, ranks, name, *, rank, bucket, text):
    for r in ranks:
        (result,) = updates(records[r], name)
        assert not result["ok"], (r, name)
        assert (result["rank"], result["bucket"]) == (rank, bucket), (r, result)
        texts = (text,) if isinstance(text, str) else text
        assert any(t in result["summary"] for t in texts), (r, result)
        assert result["elapsed"] < TIMEOUT_S / 2, (r, result)  # failed fast, no timeout waited


def test_two_ranks_correct_flat_and_failures(tmp_path, port):
    steps = [
        *flat_then_failures(last_rank=1),
        {
            "op": "update",
            "step": "req_func_raises",
            "inject": {"kind": "req_func_raises", "rank": 1},
        },
        {"op": "update", "step": "final"},
        *named_steps(last_rank=1),
    ]
    records, codes = run_ranks(tmp_path, 2, steps, port=port, per_node=2)
    assert codes == [0, 0], logs(tmp_path)
    check_flat_then_failures(records, (0, 1))
    check_named_steps(records, (0, 1))
    text = "injected req_func failure"
    assert_failed_everywhere(records, (0, 1), "req_func_raises", rank=1, bucket=None, text=text)
    # before any bucket: every rank says that no worker was sent one (nothing written anywhere)
    assert all(updates(records[r], "req_func_raises")[0]["untouched"] for r in (0, 1))
    assert all(updates(records[r], "final")[0]["ok"] for r in (0, 1))


@pytest.mark.gpu
def test_gpu_ranks_correct_flat_and_failures(tmp_path, port):
    import torch

    world = min(2, torch.cuda.device_count())  # NCCL needs one GPU per rank
    records, codes = run_ranks(
        tmp_path,
        world,
        [*flat_then_failures(last_rank=world - 1), *named_steps(last_rank=world - 1)],
        port=port,
        per_node=world,
        device="cuda",
    )
    assert codes == [0] * world, logs(tmp_path)
    check_flat_then_failures(records, tuple(range(world)))
    check_named_steps(records, tuple(range(world)))


def test_four_ranks_on_two_nodes(tmp_path, port):
    steps = [
        {"op": "update", "step": "first"},
        {
            "op": "update",
            "step": "run_raises",
            "inject": {"kind": "fail_at", "rank": 3, "bucket": 5},
        },
        {"op": "update", "step": "second"},
        {
            "op": "update",
            "step": "ps_killed",
            "inject": {"kind": "kill_ps_at", "rank": 2, "bucket": 1},
        },
    ]
    records, codes = run_ranks(tmp_path, 4, steps, port=port, per_node=2)
    assert codes[2] == -9 and [codes[r] for r in (0, 1, 3)] == [0, 0, 0], logs(tmp_path)
    for r in range(4):
        assert updates(records[r], "first")[0]["ok"] and updates(records[r], "second")[0]["ok"], (
            records[r]
        )
    assert_failed_everywhere(
        records, range(4), "run_raises", rank=3, bucket=5, text="injected failure at bucket 5"
    )
    for r in (0, 1, 3):
        (result,) = updates(records[r], "ps_killed")
        assert not result["ok"] and "lost contact" in result["summary"], result
        assert result["elapsed"] < TIMEOUT_S / 2
        assert "UpdateAborted" in result["worker"]["error"]
        assert records[r][-1]["op"] == "close" and records[r][-1]["leftover_shm"] == []
