"""One system's side of the training-step benchmark (issue 18), launched by
``bench/run.py --steps N`` under torchrun (one rank).

Every step, as a trainer would, new bytes are written to the checkpoint files first (step k:
every bf16 tensor of the workload with k added to its raw 16-bit words, so every word changes
and the worker can rebuild what to expect); then, timed from "files complete" to "the worker
has applied the step" (its post-hook ran; bytes checked after the clock stops):

- ``ours``: ``ParameterServer.register_and_update`` (one pass: reads into the host pool
  overlapped with the broadcast), then the previous step's checkpoint unregistered (its buffers
  back in the pool for the next step);
- ``ours-2pass``: ``register_checkpoint`` (files read into the pool, not pinned in place) +
  ``gather_metas`` + ``update``: the pool without the overlap;
- ``upstream``: checkpoint-engine 0.4.2 as its users run a step: ``register_checkpoint(files)``
  (new pinned memory each time) + ``gather_metas`` + ``update`` + ``unregister_checkpoint``;
- ``instanttensor``: ``instanttensor.safe_open(files, device=...)``, every tensor copied into
  the parameters of this process (it loads files into the GPU of its own process: no second
  process, no host copy kept).

Writes ``<system>-rank0.json`` into ``--result-dir``: seconds per step, exactness, host RSS
and device memory per step (flatness), where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import shutil
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.workload import WORKLOADS, gen, total_bytes, workload_spec  # noqa: E402


def step_bits(base: torch.Tensor, k: int) -> torch.Tensor:
    """Step ``k``'s tensor: ``k`` added to every raw 16-bit word of ``base`` (wrapping)."""
    return (base.view(torch.int16) + k).view(base.dtype)


class Trainer:
    """Writes step ``k``'s files: one file per layer, every byte new (untimed; its seconds are
    printed, to show where a run's time goes). The host staging copy is allocated once (pinned
    on CUDA) and the files are rewritten in place after the first step, so a step's write is
    one device-to-host copy and one memcpy into the page cache, not 17 GB of fresh pages twice."""

    def __init__(self, base: dict[str, torch.Tensor], directory: Path) -> None:
        self.base, self.directory = base, directory
        pin = next(iter(base.values())).is_cuda
        self.host = {n: torch.empty_like(t, device="cpu", pin_memory=pin) for n, t in base.items()}
        layers: dict[str, list[str]] = {}
        for name in base:
            layers.setdefault(".".join(name.split(".")[:2]), []).append(name)
        directory.mkdir(parents=True, exist_ok=True)
        self.files = [(str(directory / f"{layer}.safetensors"), ns) for layer, ns in layers.items()]

    def write(self, k: int) -> list[str]:
        start = time.perf_counter()
        for name, t in self.base.items():
            self.host[name].copy_(step_bits(t, k), non_blocking=True)
        if next(iter(self.base.values())).is_cuda:
            torch.cuda.synchronize()
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda f: self._write(*f), self.files))
        print(f"step {k}: files written in {time.perf_counter() - start:.1f} s", flush=True)
        return [path for path, _ in self.files]

    def _write(self, path: str, names: list[str]) -> None:
        head, _ = harness.safetensors_header([(n, self.host[n]) for n in names])
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)  # in place: no truncation
        try:
            pos = os.pwrite(fd, head, 0)
            for name in names:
                view = memoryview(self.host[name].view(-1).view(torch.uint8).numpy())
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], pos + done)
                pos += len(view)
            os.ftruncate(fd, pos)
        finally:
            os.close(fd)


def worker_main(kind, device_type, index, spec, q, res, dump_after_s=0.0):
    """The colocated worker: applies each update into flat parameters; after it, compares
    them with step k's bytes (rebuilt here) and answers on ``res``."""
    import zmq

    if dump_after_s > 0:  # where a run that is about to be killed spends its time
        faulthandler.dump_traceback_later(dump_after_s, exit=False)
    try:
        if device_type == "cuda":
            torch.cuda.set_device(index)
        base, params, views = harness.flat_params(device_type, index, spec)
        if kind == "upstream":
            from checkpoint_engine.worker import update_weights_from_ipc
        else:
            from ckpt_engine import update_weights_from_ipc
        ctx = zmq.Context()
    except BaseException:
        res.put({"error": traceback.format_exc()})
        return
    res.put("ready")

    def run(weights):
        for name, w in weights:
            views[name].copy_(w)

    def post_hook():
        harness.sync(device_type, index)

    while True:
        msg = q.get()
        if msg is None:
            break
        address, k = msg
        reply = {"exact": False, "error": None}
        try:
            update_weights_from_ipc(ctx, address, index, run=run, post_hook=post_hook)
            reply["exact"] = torch.equal(
                params.view(torch.int16), step_bits(base, k).view(torch.int16)
            )
        except BaseException as e:
            reply["error"] = f"{type(e).__name__}: {e}"
        params.zero_()
        harness.sync(device_type, index)
        res.put(reply)
    ctx.term()


class Worker:
    def __init__(self, kind, device_type, index, spec, dump_after_s=0.0):
        ctx = mp.get_context("spawn")
        self.q, self.res = ctx.Queue(), ctx.Queue()
        args = (kind, device_type, index, spec, self.q, self.res, dump_after_s)
        self.proc = ctx.Process(target=worker_main, args=args)
        self.proc.start()
        start = time.perf_counter()
        ready = self.res.get(timeout=600)
        print(f"worker ready in {time.perf_counter() - start:.1f} s", flush=True)
        if ready != "ready":
            raise RuntimeError(f"worker failed to start: {ready}")
        self.step, self.sent = 0, False

    def req_func(self, device_key):
        self.sent = False

        def req(socket_paths):
            self.q.put((dict(socket_paths)[device_key], self.step))
            self.sent = True

        return req

    def close(self):
        self.q.put(None)
        self.proc.join(60)


def run_ours(system, a, spec, base, data, dtype, index) -> list[dict]:
    from ckpt_engine import ParameterServer, PSConfig

    n = a.bucket_mib << 20  # the one pass (step_bucket_bytes) and the 2-pass update alike
    kw = {"bucket_bytes": n, "step_bucket_bytes": n} if n else {}
    config = PSConfig(timeout_s=120.0, pin_in_place=False, **kw)
    trainer = Trainer(base, data)
    ps = ParameterServer(config=config)
    worker = Worker("ours", dtype, index, spec, a.dump_after_s)
    steps = []
    try:
        for k in range(1, a.steps + 1):
            files = trainer.write(k)
            worker.step, name, error = k, f"step{k}", None
            start = time.perf_counter()
            parts = {}
            try:
                if system == "ours":
                    ps.register_and_update(name, worker.req_func(ps.device_key), files=files)
                else:
                    ps.register_checkpoint(name, files=files)
                    parts["register_s"] = time.perf_counter() - start
                    ps.gather_metas(name)
                    ps.update(name, worker.req_func(ps.device_key))
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - start
            reply = worker.res.get(timeout=600) if worker.sent else {}
            if k > 1 and f"step{k - 1}" in ps.registered_checkpoints():
                ps.unregister_checkpoint(f"step{k - 1}")
            if system == "ours":
                parts["phases"] = {p: round(v, 4) for p, v in ps.last_step_timings.items()}
            parts["update_phases"] = {
                p: round(v, 4) if isinstance(v, float) else v
                for p, v in ps.last_update_timings.items()
            }
            steps.append(record(k, seconds, error, reply, dtype, index, parts))
            steps[-1]["pool"] = {"allocated": ps.host_pool.allocated}
    finally:
        worker.close()
        ps.close()
    return steps


def run_upstream(a, spec, base, data, index) -> list[dict]:
    from checkpoint_engine.ps import ParameterServer

    trainer = Trainer(base, data)
    ps = ParameterServer(auto_pg=True)
    worker = Worker("upstream", "cuda", index, spec, a.dump_after_s)
    steps = []
    try:
        for k in range(1, a.steps + 1):
            files = trainer.write(k)
            worker.step, name, error, parts = k, f"step{k}", None, {}
            start = time.perf_counter()
            try:
                ps.register_checkpoint(name, files=files)
                parts["register_s"] = time.perf_counter() - start
                ps.gather_metas(name)
                ps.update(name, worker.req_func(ps._device_uuid))
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - start
            reply = worker.res.get(timeout=600) if worker.sent else {}
            with contextlib.suppress(Exception):
                ps.unregister_checkpoint(name)
            steps.append(record(k, seconds, error, reply, "cuda", index, parts))
    finally:
        worker.close()
    return steps


def run_instanttensor(a, spec, base, data, index) -> list[dict]:
    from instanttensor import safe_open

    dev = torch.device("cuda", index)
    params = {n: torch.empty_like(t) for n, t in base.items()}
    trainer = Trainer(base, data)
    steps = []
    for k in range(1, a.steps + 1):
        files = trainer.write(k)
        error = None
        start = time.perf_counter()
        try:
            with safe_open(files, framework="pt", device=dev.index, copy=False) as f:
                for name, tensor in f.tensors():
                    params[name].copy_(tensor)
            torch.cuda.synchronize(index)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - start
        exact = error is None and all(
            torch.equal(params[n].view(torch.int16), step_bits(t, k).view(torch.int16))
            for n, t in base.items()
        )
        steps.append(record(k, seconds, error, {"exact": exact}, "cuda", index, {}))
    return steps


def record(k, seconds, error, reply, dtype, index, parts) -> dict:
    print(
        f"step {k}: {seconds:.3f} s, exact {bool(reply.get('exact'))}, error {error}, {parts}",
        flush=True,
    )
    return {
        "step": k,
        "seconds": seconds,
        "error": error or reply.get("error"),
        "exact": error is None and bool(reply.get("exact")),
        "rss": harness.rss_bytes(),
        "device_used": harness.used_bytes(dtype, index),
        **parts,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--system", required=True, choices=("ours", "ours-2pass", "upstream", "instanttensor")
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gib", type=float, required=True)
    ap.add_argument("--shrink", type=int, default=1)
    ap.add_argument("--workload", default="dense", choices=WORKLOADS)
    ap.add_argument("--tensors", type=int, default=50_000)
    ap.add_argument("--bucket-mib", type=int, default=0)
    ap.add_argument("--read-chunk-mib", type=int, default=0, help="ours: staged read chunk size")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--result-dir", required=True)
    ap.add_argument(
        "--dump-after-s",
        type=float,
        default=0.0,
        help="print every thread's stack after this many seconds (before bench/run.py's limit)",
    )
    a = ap.parse_args()
    if a.read_chunk_mib:
        from ckpt_engine.ps import staging

        staging.READ_CHUNK_BYTES = a.read_chunk_mib << 20
    if a.dump_after_s > 0:
        faulthandler.dump_traceback_later(a.dump_after_s, exit=False)
    from ckpt_engine import device as ce_device

    dtype = ce_device.resolve_device_type(None)
    index = int(os.environ.get("LOCAL_RANK", 0))
    if dtype == "cuda":
        torch.cuda.set_device(index)
    spec = workload_spec(a.workload, a.gib, a.shrink, a.tensors)
    dev = harness.device_of(dtype, index)
    start = time.perf_counter()
    base = {name: gen(i, shape, dev) for i, (name, shape) in enumerate(spec)}
    print(f"{a.system}: workload generated in {time.perf_counter() - start:.1f} s", flush=True)
    data = Path(a.data_dir) / a.system
    out = {"system": a.system, "device_type": dtype, "tensors": len(spec)}
    out["checkpoint_bytes"] = total_bytes(spec)
    if dtype == "cuda":
        out["device"] = torch.cuda.get_device_name(index)
    try:
        if a.system.startswith("ours"):
            out["steps"] = run_ours(a.system, a, spec, base, data, dtype, index)
        elif a.system == "upstream":
            out["steps"] = run_upstream(a, spec, base, data, index)
        else:
            out["steps"] = run_instanttensor(a, spec, base, data, index)
    except Exception:
        out["error"] = traceback.format_exc()[-3000:]
    finally:
        shutil.rmtree(data, ignore_errors=True)
    path = Path(a.result_dir) / f"{a.system}-rank0.json"
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
