"""Fork link probe: the remote-instance transfer backend alone, between two processes.

`bench/fork.py` times a whole fork (servers, manifests, HTTP). This probe isolates the transfer
seam (`workers.remote_instance.backend`): process 0 connects as the seed (group rank 0) on
device 0 and sends `--count` tensors of `--mib` MiB, process 1 receives them on device 1 into
preallocated tensors, and the receiver times the stream from its first receive to the final
`flush`. Every received tensor is checked (a fill value per tensor). Run it under NCCL_DEBUG=INFO
to see which NCCL transport (P2P/IPC, P2P/CUMEM, SHM) the pair uses.

GPU:  python3 bench/fork_link.py --count 64 --mib 256
CPU:  python3 bench/fork_link.py --backend gloo --count 8 --mib 16
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import free_port  # noqa: E402


def side(rank: int, a: argparse.Namespace, port: int, out: mp.Queue) -> None:
    from workers.remote_instance.backend import get_backend

    backend = get_backend(a.backend)
    if backend.device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    n = a.mib << 20
    tensors = [torch.empty(n, dtype=torch.uint8, device=device) for _ in range(a.count)]
    if rank == 0:
        for i, t in enumerate(tensors):
            t.fill_(i % 251)
    group = backend.connect(
        master_address="127.0.0.1",
        port=port,
        group_rank=rank,
        group_name="fork-link-probe",
        timeout=a.timeout,
        device=device,
    )
    try:
        for _ in range(a.warmup):
            (group.send if rank == 0 else group.recv)(tensors[0])
        group.flush()
        start = time.perf_counter()
        for t in tensors:
            (group.send if rank == 0 else group.recv)(t)
        group.flush()
        seconds = time.perf_counter() - start
        bad = [i for i, t in enumerate(tensors) if rank == 1 and not bool((t == i % 251).all())]
        out.put((rank, seconds, bad))
    finally:
        group.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="nccl")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=side, args=(r, a, port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, seconds, bad = out.get(timeout=a.timeout * 3)
            results[rank] = (seconds, bad)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    total = a.count * (a.mib << 20)
    seconds, bad = results[1]
    print(
        f"{a.backend}: {a.count} x {a.mib} MiB = {total / 1e9:.2f} GB in {seconds:.3f} s "
        f"({total / 1e9 / seconds:.1f} GB/s) at the receiver; sender {results[0][0]:.3f} s; "
        f"{'every tensor exact' if not bad else f'WRONG tensors: {bad[:10]}'}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
