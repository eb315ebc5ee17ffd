"""Pieces both benchmark sides share (bench/ours.py, bench/upstream.py): the host-to-device
ceiling, device-memory sampling, the workload written as safetensors files, and the colocated
inference worker that checks every byte it receives.

The worker is the anchor's (../shared/bench/anchor_ckpt_engine.py): it preallocates its
tensor-parallel row shard of every tensor and its ``run`` copies each received tensor's shard
into it (what ``load_weights`` does). After each update it compares every parameter with the
expected shard it regenerated itself, bit for bit (bf16 viewed as int16, ``torch.equal``), then
zeroes the parameters so that a tensor missing from the next update is caught too. (A tensor
delivered twice is the update's own error: our worker refuses it, see ckpt_engine.worker.)
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.workload import gen, owned, shard, shard_shape

GiB = 1 << 30


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_of(device_type: str, index: int) -> torch.device:
    return torch.device("cuda", index) if device_type == "cuda" else torch.device("cpu")


def h2d_ceiling(device_type: str, index: int, nbytes: int = 2 * GiB, reps: int = 5) -> float:
    """GB/s of one pinned host buffer copied to the device (as the anchor measures it); on CPU,
    the GB/s of a memcpy of the same size (the CPU path's copy ceiling)."""
    if device_type == "cuda":
        host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device_of(device_type, index))
    else:
        host = torch.ones(nbytes, dtype=torch.uint8)
        dev = torch.empty(nbytes, dtype=torch.uint8)
    for _ in range(2):
        dev.copy_(host, non_blocking=True)
    sync(device_type, index)
    start = time.perf_counter()
    for _ in range(reps):
        dev.copy_(host, non_blocking=True)
    sync(device_type, index)
    gbps = reps * nbytes / (time.perf_counter() - start) / 1e9
    del host, dev
    if device_type == "cuda":
        torch.cuda.empty_cache()
    return gbps


def sync(device_type: str, index: int) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize(index)


def used_bytes(device_type: str, index: int, shm_dir: str = "/dev/shm") -> int:
    """Device-wide used memory (every process on the GPU); on CPU, used bytes of the shm
    filesystem (where the CPU path's IPC buffer lives)."""
    if device_type == "cuda":
        free, total = torch.cuda.mem_get_info(index)
        return int(total - free)
    st = os.statvfs(shm_dir)
    return int((st.f_blocks - st.f_bfree) * st.f_frsize)


class MemorySampler:
    """Samples ``used_bytes`` on a thread every ``interval_s``; ``peak`` over the window."""

    def __init__(self, device_type: str, index: int, interval_s: float = 0.002) -> None:
        self.args = (device_type, index)
        self.interval_s = interval_s
        self.peak = used_bytes(*self.args)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.args[0] == "cuda":
            torch.cuda.set_device(self.args[1])
        while not self._stop.is_set():
            self.peak = max(self.peak, used_bytes(*self.args))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, used_bytes(*self.args))


def throughput(seconds: float, nbytes: int) -> dict:
    return {"seconds": seconds, "bytes": nbytes, "gbps": nbytes / seconds / 1e9}


def timed_update(ps, device_key: str, q, res, device_type: str, index: int) -> dict:
    """One ``ps.update("bench", ...)`` into the colocated worker (sent its socket path for
    ``device_key`` over ``q``): seconds, error, the worker's verdict, device memory used."""

    def req_func(socket_paths):
        q.put(dict(socket_paths)[device_key])

    base = used_bytes(device_type, index)
    with MemorySampler(device_type, index) as mem:
        start = time.perf_counter()
        error = None
        try:
            ps.update("bench", req_func)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - start
    after = used_bytes(device_type, index)
    worker = res.get(timeout=600)
    return {
        "seconds": seconds,
        "error": error,
        "exact": error is None and worker.get("exact", False),
        "worker": worker,
        "peak_extra": mem.peak - base,
        "leftover": after - base,
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def safetensors_header(tensors: list[tuple[str, torch.Tensor]]) -> tuple[bytes, int]:
    """The length prefix and JSON header (padded to 8 bytes) of a safetensors file holding
    the bf16 ``tensors`` back to back, and the bytes of its data section."""
    header, offset = {}, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": "BF16",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offset


def _write_file(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> int:
    """A safetensors file written straight from CPU tensors."""
    head, nbytes = safetensors_header(tensors)
    with open(path, "wb") as f:
        f.write(head)
        for _, t in tensors:
            f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
    return nbytes


def flat_params(device_type: str, index: int, spec) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A worker's expected weights (the workload's tensors, one flat bf16 buffer), its
    parameters (another, same size) and a view of the parameters per tensor name."""
    dev = device_of(device_type, index)
    sizes = [torch.Size(shape).numel() for _, shape in spec]
    base = torch.empty(sum(sizes), dtype=torch.bfloat16, device=dev)
    params = torch.empty_like(base)
    views, start = {}, 0
    for i, ((name, shape), n) in enumerate(zip(spec, sizes)):
        base[start : start + n].copy_(gen(i, shape, dev).reshape(-1))
        views[name] = params[start : start + n].view(shape)
        start += n
    return base, params, views


def rank_tensors(spec, rank: int, world: int, device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's tensors (round robin), generated on ``device``, returned on the CPU."""
    out = {}
    for i in owned(spec, rank, world):
        name, shape = spec[i]
        out[name] = gen(i, shape, device).cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def write_rank_files(
    tensors: dict[str, torch.Tensor], directory: Path, rank: int, threads: int = 8
) -> list[str]:
    """One file per layer ("layers.<n>": this rank's tensors of it), written in parallel; the
    paths."""
    layers: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        layers.setdefault(".".join(name.split(".")[:2]), []).append((name, t))
    directory.mkdir(parents=True, exist_ok=True)
    jobs = [(directory / f"r{rank}-{layer}.safetensors", ts) for layer, ts in layers.items()]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda job: _write_file(*job), jobs))
    return [str(p) for p, _ in jobs]


def worker_main(
    kind: str, device_type: str, index: int, rank: int, world: int, spec, q, res, copy="tensor"
):
    """The colocated inference worker (spawned). ``kind``: ``ours`` or ``upstream`` (whose
    ``update_weights_from_ipc`` it calls). Takes its socket address from ``q`` per update;
    None ends it. Answers on ``res``: "ready", then one dict per update (exact, mismatches,
    error, seconds, seconds inside ``run``, rss).

    The parameters are views into one flat buffer, and the expected shards another, so the
    check after each update is one comparison. ``copy``: ``tensor`` copies each received tensor's
    shard into its parameter (one copy per tensor, as ``load_weights`` does); ``foreach`` copies
    a bucket's shards with one ``torch._foreach_copy_`` (batched kernels; one rank: the whole
    tensor is its shard), which takes most of the worker's per-tensor work out of the
    measurement of the transfer itself."""
    import zmq

    try:
        dev = device_of(device_type, index)
        if device_type == "cuda":
            torch.cuda.set_device(index)
        shards = [shard_shape(shape, world) for _, shape in spec]
        total = sum(torch.Size(s).numel() for s in shards)
        expected_flat = torch.empty(total, dtype=torch.bfloat16, device=dev)
        params_flat = torch.empty_like(expected_flat)
        expected, params, start = {}, {}, 0
        for i, ((name, shape), sshape) in enumerate(zip(spec, shards)):
            n = torch.Size(sshape).numel()
            expected[name] = expected_flat[start : start + n].view(sshape)
            expected[name].copy_(shard(gen(i, shape, dev), rank, world))
            params[name] = params_flat[start : start + n].view(sshape)
            start += n
        del shards
        if device_type == "cuda":
            torch.cuda.synchronize(index)
            torch.cuda.empty_cache()
        if kind == "ours":
            from ckpt_engine import update_weights_from_ipc
        else:
            from checkpoint_engine.worker import update_weights_from_ipc
        ctx = zmq.Context()
    except BaseException:
        res.put({"error": traceback.format_exc()})
        return
    res.put("ready")
    in_run = [0.0]

    def run(weights):
        t0 = time.perf_counter()
        if copy == "foreach":
            if weights:
                names, received = zip(*weights)
                srcs = list(received) if world == 1 else [shard(w, rank, world) for w in received]
                torch._foreach_copy_(list(map(params.__getitem__, names)), srcs)
        else:
            for name, w in weights:
                params[name].copy_(shard(w, rank, world))
        in_run[0] += time.perf_counter() - t0

    def post_hook():
        if device_type == "cuda":
            torch.cuda.synchronize(index)

    while True:
        msg = q.get()
        if msg is None:
            break
        reply: dict = {"exact": False, "error": None}
        in_run[0] = 0.0
        start = time.perf_counter()
        try:
            update_weights_from_ipc(ctx, msg, index, run=run, post_hook=post_hook)
            reply["seconds"] = time.perf_counter() - start
            reply["run_s"] = in_run[0]
            sync(device_type, index)
            bad = []
            if not same_bits(params_flat, expected_flat):
                bad = [n for n, p in params.items() if not same_bits(p, expected[n])]
            reply.update(exact=not bad, mismatches=len(bad), first_bad=bad[:3])
        except BaseException as e:
            reply["error"] = f"{type(e).__name__}: {e}"
        params_flat.zero_()
        sync(device_type, index)
        reply["rss"] = rss_bytes()
        res.put(reply)
    ctx.term()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.element_size() == 2:
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
