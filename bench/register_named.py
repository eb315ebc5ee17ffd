"""Register probe for many named tensors (issue 17): ``Registry.register(named_tensors=...)``
with 10^5 separately allocated small host tensors (MoE experts), each phase timed.

Per copy method (``ckpt_engine.ps.hostcopy``: ``auto`` = readv into new buffers, writev into
reused ones; ``writev`` = process_vm_writev batches,
``memmove`` = one ctypes.memmove a tensor) a fresh registry registers the tensors twice: first
into new memory (populated and pinned on a GPU host), then again after an unregister (the host
pool's buffers reused, as every training step after the first). Phases: page tables and
cudaHostRegister (host_memory.pin_all; unpinned: host_memory.populate_all), the copy list and
the records (with ``--beside 1``, named.PLAN_BESIDE_PIN, made on a thread beside pinning and
the copies: their own wall time then, off the critical path when shorter), the copies, and the
whole call. ``--pretouch-gib``: touch and free that much memory first (a VM whose memory was
never touched faults it in slowly: the first registration's page tables then cost seconds).

GPU:  python3 bench/register_named.py --tensors 150000 --kib 143 --threads 16
CPU:  python3 bench/register_named.py --tensors 150000 --kib 16 --threads 2 --no-pin --pretouch-gib 6
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckpt_engine import host_memory
from ckpt_engine.ps import hostcopy
from ckpt_engine.ps import named as named_mod
from ckpt_engine.ps import registry as registry_mod

timings: dict[str, float] = defaultdict(float)


def timed(module, name: str, label: str) -> None:
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[label] += time.perf_counter() - start

    setattr(module, name, wrapper)


def pin_all(buffers, *, threads):
    populate_s, register_s = real_pin_all(buffers, threads=threads)
    timings["page tables"] += populate_s
    timings["cudaHostRegister"] += register_s
    return populate_s, register_s


def populate_all(buffers, *, threads):
    seconds = real_populate_all(buffers, threads=threads)
    timings["page tables"] += seconds
    return seconds


real_pin_all, real_populate_all = host_memory.pin_all, host_memory.populate_all
host_memory.pin_all, host_memory.populate_all = pin_all, populate_all
for fn, label in [
    ("check_named", "check"),
    ("plan_copies", "copy list"),
    ("metas_of", "records"),
    ("copy_host", "copies"),
    ("copy_by_torch", "torch copies"),
]:
    timed(registry_mod, fn, label)


def make_tensors(count: int, kib: int) -> dict[str, torch.Tensor]:
    cols = 1024
    rows = max(1, kib * 1024 // 2 // cols)
    out = {}
    for i in range(count):
        t = torch.empty(rows, cols, dtype=torch.bfloat16)
        t.view(torch.int16).fill_(i % 32749)
        out[f"model.layers.{i // 768}.mlp.experts.{i % 256}.w{i % 3}.weight"] = t
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=150_000)
    ap.add_argument("--kib", type=int, default=143)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--methods", default="auto,writev,memmove")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--beside", default="1,0", help="named.PLAN_BESIDE_PIN values to try")
    ap.add_argument("--pretouch-gib", type=int, default=0)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    pin = not a.no_pin and torch.cuda.is_available()
    start = time.perf_counter()
    named = make_tensors(a.tensors, a.kib)
    nbytes = sum(t.nbytes for t in named.values())
    for _ in range(a.pretouch_gib):
        buf = host_memory.create_anonymous(1 << 30)
        host_memory.populate_all([buf], threads=a.threads)
        buf.close()
    print(
        f"{a.tensors} tensors, {nbytes / 1e9:.2f} GB, made in {time.perf_counter() - start:.1f} s"
    )
    print(f"process_vm_writev/readv available: {hostcopy.method != 'memmove'}; pin: {pin}")
    results = []
    for method, beside in [(m, b) for m in a.methods.split(",") for b in a.beside.split(",")]:
        hostcopy.method = method
        named_mod.PLAN_BESIDE_PIN = beside == "1"
        reg = registry_mod.Registry(
            host_memory_kind="anonymous",
            shm_dir="/dev/shm",
            pin=pin,
            pin_in_place=False,
            read_threads=a.threads,
            label="probe",
            pool_bytes=nbytes + (4 << 30),
        )
        try:
            for which in ("first", "pool reused"):
                timings.clear()
                start = time.perf_counter()
                ckpt = reg.register(which, named_tensors=named)
                seconds = time.perf_counter() - start
                ok = all(
                    torch.equal(ckpt.bytes_of(m), named[m.name].view(-1).view(torch.uint8))
                    for m in ckpt.tensors[:: max(1, a.tensors // 1000)]
                )
                reg.unregister(which)
                row = {
                    "method": hostcopy.method,
                    "plan beside pin": named_mod.PLAN_BESIDE_PIN,
                    "registration": which,
                    "total": seconds,
                }
                row.update(timings)
                row.update(gbps=nbytes / seconds / 1e9, exact=ok)
                results.append(row)
                print(json.dumps(row))
        finally:
            reg.close()
    order = ["total", "check", "page tables", "cudaHostRegister", "copy list", "records"]
    order += ["copies", "torch copies", "gbps", "exact"]
    keys = [k for k in order if any(k in r for r in results)]
    print("| method, plan beside pin, registration | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for r in results:
        cells = [
            f"{r.get(k, 0.0):.3f}" if isinstance(r.get(k, 0.0), float) else str(r[k]) for k in keys
        ]
        head = f"{r['method']}, {r['plan beside pin']}, {r['registration']}"
        print(f"| {head} | " + " | ".join(cells) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
