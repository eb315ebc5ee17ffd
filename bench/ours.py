"""One rank of our side of the benchmark (launched by bench/run.py under torchrun).

1. H2D ceiling of this rank's GPU (or the memcpy ceiling on CPU).
2. This rank's share of the workload (bench/workload.py), generated on the device, written as
   safetensors files into the shm directory (one per layer).
3. Registering, each timed and then dropped except the first: (a) those files pinned in place
   (no copy: the checkpoint the updates use), (b) the same files read into fresh pinned memory
   (parallel reads from the page cache), (c) the same tensors as in-memory named tensors (what
   the anchor registers upstream's way).
4. gather_metas, then a worker process (bench/harness.py) checking every byte; ``--warmup``
   untimed updates, ``--repeat`` timed ones (device memory sampled during each), ``--soak``
   more for the flatness check (device memory, PS and worker RSS, shm usage).
Writes ``ours-rank<r>.json`` into ``--result-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.workload import WORKLOADS, total_bytes, workload_spec  # noqa: E402
from ckpt_engine import ParameterServer, PSConfig  # noqa: E402


def timed_register(config: PSConfig, **what) -> dict:
    """Register into a throwaway ParameterServer, twice: seconds and bytes of the first
    registration (new host memory, mapped, populated and pinned) and, under ``warm``, of the
    second after an unregister (a training step's: the host pool's pinned buffers reused)."""
    ps = ParameterServer(config=config)
    try:
        start = time.perf_counter()
        ps.register_checkpoint("probe", **what)
        seconds = time.perf_counter() - start
        nbytes = ps.checkpoint("probe").nbytes
        ps.unregister_checkpoint("probe")
        start = time.perf_counter()
        ps.register_checkpoint("probe2", **what)
        warm = time.perf_counter() - start
    finally:
        ps.close()
    return {**harness.throughput(seconds, nbytes), "warm": harness.throughput(warm, nbytes)}


def one_update(ps, q, res, device_type: str) -> dict:
    out = harness.timed_update(ps, ps.device_key, q, res, device_type, ps.device_index)
    out["timings"] = dict(getattr(ps, "last_update_timings", {}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--soak", type=int, default=20)
    ap.add_argument("--bucket-mib", type=int, default=0)
    ap.add_argument("--slots", type=int, default=0)
    ap.add_argument("--register", default="files,copy,named")
    ap.add_argument("--shrink", type=int, default=1)
    ap.add_argument("--workload", default="dense", choices=WORKLOADS)
    ap.add_argument("--tensors", type=int, default=50_000, help="moe: tensor count")
    ap.add_argument("--worker-copy", default="tensor", choices=("tensor", "foreach"))
    ap.add_argument("--host-memory", default="anonymous", choices=("anonymous", "shm"))
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--result-dir", required=True)
    a = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    kw = {}
    if a.bucket_mib:
        kw["bucket_bytes"] = a.bucket_mib << 20
    if a.slots:
        kw["num_slots"] = a.slots
    kw["host_memory"] = a.host_memory
    config = PSConfig(timeout_s=120.0, **kw)
    ps = ParameterServer(config=config)
    dtype, index = ps.device_type, ps.device_index
    out: dict = {"rank": rank, "world": world, "device_type": dtype, "config": repr(config)}
    if dtype == "cuda":
        out["device"] = torch.cuda.get_device_name(index)
    out["h2d_gbps"] = harness.h2d_ceiling(
        dtype, index, min(2 * harness.GiB, int(a.gib * harness.GiB))
    )
    spec = workload_spec(a.workload, a.gib, a.shrink, a.tensors)
    out["tensors"] = len(spec)
    out["checkpoint_bytes"] = total_bytes(spec)

    named = harness.rank_tensors(spec, rank, world, harness.device_of(dtype, index))
    out["own_bytes"] = sum(t.numel() * t.element_size() for t in named.values())
    data_dir = Path(a.data_dir) / f"r{rank}"
    start = time.perf_counter()
    files = harness.write_rank_files(named, data_dir, rank)
    out["write_files_s"] = time.perf_counter() - start
    kinds = a.register.split(",")
    reg: dict = {}
    start = time.perf_counter()
    ps.register_checkpoint("bench", files=files)
    seconds = time.perf_counter() - start
    nbytes = ps.checkpoint("bench").nbytes
    reg["files_in_place"] = harness.throughput(seconds, nbytes)
    if "copy" in kinds:
        no_in_place = PSConfig(timeout_s=120.0, pin_in_place=False, **kw)
        reg["files_read"] = timed_register(no_in_place, files=files)
    if "named" in kinds:
        reg["named"] = timed_register(config, named_tensors=named)
    del named
    out["register"] = reg
    start = time.perf_counter()
    ps.gather_metas("bench")
    out["gather_s"] = time.perf_counter() - start

    ctx = mp.get_context("spawn")
    q, res = ctx.Queue(), ctx.Queue()
    worker = ctx.Process(
        target=harness.worker_main,
        args=("ours", dtype, index, rank, world, spec, q, res, a.worker_copy),
    )
    worker.start()
    ready = res.get(timeout=600)
    if ready != "ready":
        raise RuntimeError(f"worker failed to start: {ready}")
    try:
        out["warmup"] = [one_update(ps, q, res, dtype) for _ in range(a.warmup)]
        out["updates"] = [one_update(ps, q, res, dtype) for _ in range(a.repeat)]
        before = soak_state(ps, dtype)
        soak = [one_update(ps, q, res, dtype) for _ in range(a.soak)]
        out["soak"] = {
            "n": len(soak),
            "exact": all(u["exact"] for u in soak),
            "seconds": [u["seconds"] for u in soak],
            "before": before,
            "after": soak_state(ps, dtype),
            "worker_rss": [u["worker"].get("rss", 0) for u in soak],
        }
    finally:
        q.put(None)
        worker.join(60)
        ps.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    path = Path(a.result_dir) / f"ours-rank{rank}.json"
    path.write_text(json.dumps(out, indent=1))


def soak_state(ps, device_type: str) -> dict:
    return {
        "device_used": harness.used_bytes(device_type, ps.device_index),
        "ps_rss": harness.rss_bytes(),
        "shm_used": harness.used_bytes("cpu", 0),
    }


if __name__ == "__main__":
    main()
