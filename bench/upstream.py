"""One rank of the upstream side of the benchmark: checkpoint-engine 0.4.2 run as the anchor
runs it (../shared/bench/anchor_ckpt_engine.py): named tensors registered (upstream pins them),
gather_metas, then ``ParameterServer(auto_pg=True).update`` into a colocated worker whose
``run`` copies its row shard of every tensor. Same worker, checks and memory sampling as ours
(bench/harness.py), no sleeps: the worker reports ready before the first update.
Writes ``upstream-rank<r>.json`` into ``--result-dir``. GPU only (upstream needs CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.workload import WORKLOADS, total_bytes, workload_spec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--result-dir", required=True)
    ap.add_argument("--shrink", type=int, default=1)
    ap.add_argument("--workload", default="dense", choices=WORKLOADS)
    ap.add_argument("--tensors", type=int, default=50_000, help="moe: tensor count")
    ap.add_argument("--worker-copy", default="tensor", choices=("tensor", "foreach"))
    a = ap.parse_args()
    from checkpoint_engine.ps import ParameterServer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    index = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(index)
    out: dict = {"rank": rank, "world": world, "device_type": "cuda"}
    out["device"] = torch.cuda.get_device_name(index)
    out["h2d_gbps"] = harness.h2d_ceiling(
        "cuda", index, min(2 * harness.GiB, int(a.gib * harness.GiB))
    )
    spec = workload_spec(a.workload, a.gib, a.shrink, a.tensors)
    out["tensors"] = len(spec)
    out["checkpoint_bytes"] = total_bytes(spec)
    named = harness.rank_tensors(spec, rank, world, torch.device("cuda", index))
    out["own_bytes"] = sum(t.numel() * t.element_size() for t in named.values())

    ctx = mp.get_context("spawn")
    q, res = ctx.Queue(), ctx.Queue()
    ps = ParameterServer(auto_pg=True)
    worker = ctx.Process(
        target=harness.worker_main,
        args=("upstream", "cuda", index, rank, world, spec, q, res, a.worker_copy),
    )
    worker.start()
    start = time.perf_counter()
    ps.register_checkpoint("bench", named_tensors=named)
    seconds = time.perf_counter() - start
    out["register"] = {"named": harness.throughput(seconds, out["own_bytes"])}
    del named
    start = time.perf_counter()
    ps.gather_metas("bench")
    out["gather_s"] = time.perf_counter() - start
    ready = res.get(timeout=600)
    if ready != "ready":
        raise RuntimeError(f"worker failed to start: {ready}")
    try:
        for key, n in (("warmup", a.warmup), ("updates", a.repeat)):
            out[key] = [
                harness.timed_update(ps, ps._device_uuid, q, res, "cuda", index) for _ in range(n)
            ]
    finally:
        q.put(None)
        worker.join(60)
    path = Path(a.result_dir) / f"upstream-rank{rank}.json"
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
