"""The host path's device-to-host copies alone (ckpt_engine.ps.named.copy_by_torch), one copy per
tensor against packed on the device (ckpt_engine.ps.gather), on the MoE workload's tensors
(bench/workload.py), into pinned host buffers laid out as a registration lays them out.

Per method and repetition: the host buffers zeroed, the tensors rewritten on the device (not
timed), then ``copy_by_torch`` timed from call to return (every byte landed), then a sample
of 2,000 tensors (and every tensor of the first buffer) compared byte for byte with the device.

    python3 bench/gather.py --gib 16 --tensors 150000          # GPU, 1x H200: about 1-2 minutes
    python3 bench/gather.py --gib 2 --tensors 20000 --staging-mib 64
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.workload import moe_spec_for, total_bytes  # noqa: E402
from ckpt_engine.ps import gather  # noqa: E402
from ckpt_engine.ps.named import copy_by_torch, pack  # noqa: E402


def check(buffers, tensors, where, offsets, sample) -> bool:
    for i in sample:
        t = tensors[i]
        want = t.view(-1).view(torch.uint8).cpu()
        got = buffers[where[i]][offsets[i] : offsets[i] + t.nbytes]
        if not torch.equal(got, want):
            print(f"MISMATCH at tensor {i}", flush=True)
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=16.0)
    ap.add_argument("--tensors", type=int, default=150_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--staging-mib", type=int, default=gather.STAGING_BYTES >> 20)
    ap.add_argument("--methods", default="per_tensor,packed")
    ap.add_argument("--cpu", action="store_true", help="smoke run of this script (no packing)")
    a = ap.parse_args()
    device = "cpu" if a.cpu else "cuda"
    if not a.cpu:
        torch.cuda.set_device(0)
    spec = moe_spec_for(a.gib, a.tensors)
    g = torch.Generator(device=device).manual_seed(0)
    tensors = [torch.empty(shape, dtype=torch.bfloat16, device=device) for _, shape in spec]
    named = {name: t for (name, _), t in zip(spec, tensors)}
    sizes = [t.nbytes for t in tensors]
    chunks, where, offsets = pack(sizes)
    start = time.perf_counter()
    buffers = [torch.empty(n, dtype=torch.uint8, pin_memory=not a.cpu) for n in chunks]
    print(f"{total_bytes(spec) / 1e9:.2f} GB, {len(spec)} tensors, {len(chunks)} buffers; "
          f"pinned in {time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    first = [i for i, w in enumerate(where) if w == 0]
    sample = sorted(set(random.Random(0).sample(range(len(tensors)), 2000)) | set(first))
    gather.STAGING_BYTES = a.staging_mib << 20
    results: dict[str, list[float]] = {}
    exact = True
    for method in a.methods.split(","):
        gather.MIN_TENSORS = 16 if method == "packed" else 1 << 62
        for rep in range(a.reps):
            for b in buffers:
                b.zero_()
            for t in tensors:  # new bytes (finished before the clock starts)
                t.normal_(generator=g)
            if not a.cpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            copy_by_torch(buffers, named, list(range(len(tensors))), sizes, where, offsets)
            seconds = time.perf_counter() - start
            ok = check(buffers, tensors, where, offsets, sample)
            exact &= ok
            results.setdefault(method, []).append(seconds)
            print(f"{method} rep {rep}: {seconds:.3f} s "
                  f"({sum(sizes) / seconds / 1e9:.1f} GB/s), exact {ok}", flush=True)  # fmt: skip
    name = "CPU" if a.cpu else torch.cuda.get_device_name(0)
    print(f"| {name}, {sum(sizes) / 1e9:.2f} GB, {len(tensors)} tensors "
          f"| median | min-max |")  # fmt: skip
    print("|---|---|---|")
    for method, secs in results.items():
        print(f"| {method} | {statistics.median(secs):.3f} s | {min(secs):.3f}-{max(secs):.3f} s |")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
