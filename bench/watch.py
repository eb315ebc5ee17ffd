"""Per-step cost of the two ways a trainer feeds a running inference engine every step (issue 17,
item 5), on one device, the dense workload or, with ``--workload moe``, the many-tensor one
(bench/workload.py):

- ``watch``: the updater as it runs in production, ``python -m ckpt_engine.update --watch DIR``
  (one rank, started once, ``--register-mode overlap`` by default), in front of a stub inference
  server (``/ping``, ``POST /collective_rpc``) that hands each update to the colocated worker.
  Step k: the trainer writes ``DIR/step-k/`` (new bytes: bench/steps.py's ``step_bits``; not
  timed), then the marker ``COMPLETE``; the clock runs from the marker to the worker's post-hook
  (so it includes the poll interval, ``--watch-interval``, 0.02 s here). The updater's start
  (process, imports, CUDA, process group, /ping: what a fresh updater pays every step) is
  printed apart; step 1 starts once it watches. The updater's own
  ``push_seconds`` (its --json-out) is shown beside it. Step k-1's folder is deleted after step k.
- ``trainer``: the weights on the trainer's device (as a gathered FSDP / Megatron shard),
  pushed in this process: ``unregister_checkpoint(previous)`` + ``register_and_update(name,
  req_func, named_tensors=weights)`` (the update fills the slots device-to-device from the
  weights while their device-to-host copy into the pool's pinned buffers runs beside it:
  ckpt_engine.ps.direct); the clock runs from the call to its return (the worker's post-hook
  has run and that host copy is complete: what the trainer waits for); the phases
  (``last_step_timings``: ``update``, ``host_copy``, ...) are printed per step, and
  ``host_path_copy``: the seconds of the tensors that took the host path (``register`` holds
  them: past ``direct.MAX_TENSORS``, all of them; gathered on the device first when many,
  ckpt_engine.ps.gather). The step's new values are written into the weights on the device
  first (not timed).

The worker (a spawned process, one per run) copies each bucket into its parameters with one
``torch._foreach_copy_`` (so that 10^5 expert tensors measure the transfer, not a Python loop of
the worker) and checks every byte of every step after its post-hook (bf16 as int16, ``torch.equal``). Step 1 of each mode allocates and pins the pool
(reported apart); the table shows the median and the range of the later steps.

    python bench/watch.py --gib 16 --steps 4            # GPU: about 2-3 minutes
    python bench/watch.py --cpu --gib 0.05 --shrink 8 --steps 3    # CPU smoke run, ~30 s
    python bench/watch.py --gib 16 --modes trainer --workload moe --tensors 150000
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.steps import Trainer, step_bits  # noqa: E402
from bench.workload import gen, total_bytes, workload_spec  # noqa: E402


def worker_main(device_type, index, spec, q, res):
    """Applies each update into flat parameters; answers the post-hook's wall time and whether
    every byte is step k's."""
    import zmq

    from ckpt_engine import update_weights_from_ipc

    try:
        if device_type == "cuda":
            torch.cuda.set_device(index)
        base, params, views = harness.flat_params(device_type, index, spec)
        ctx = zmq.Context()
    except BaseException:
        res.put({"error": traceback.format_exc()})
        return
    res.put("ready")
    while (msg := q.get()) is not None:
        address, k = msg
        reply = {"exact": False, "error": None, "applied": None}

        def run(weights):
            if weights:
                names, received = zip(*weights)
                torch._foreach_copy_(list(map(views.__getitem__, names)), list(received))

        def post_hook(reply=reply):
            harness.sync(device_type, index)
            reply["applied"] = time.time()

        try:
            update_weights_from_ipc(ctx, address, index, run=run, post_hook=post_hook)
            bits = step_bits(base, k).view(torch.int16)
            reply["exact"] = torch.equal(params.view(torch.int16), bits)
        except BaseException as e:
            reply["error"] = f"{type(e).__name__}: {e}"
        params.zero_()
        harness.sync(device_type, index)
        res.put(reply)
    ctx.term()


class Worker:
    def __init__(self, device_type, index, spec):
        ctx = mp.get_context("spawn")
        self.q, self.res = ctx.Queue(), ctx.Queue()
        args = (device_type, index, spec, self.q, self.res)
        self.proc = ctx.Process(target=worker_main, args=args, daemon=True)
        self.proc.start()
        ready = self.res.get(timeout=600)
        if ready != "ready":
            raise RuntimeError(f"worker failed to start: {ready}")
        self.step = 0
        self.replies: dict[int, dict] = {}
        self.cond = threading.Condition()

    def apply(self, address: str) -> dict:
        """Hand one update to the worker (step ``self.step``); its reply once applied."""
        k = self.step
        self.q.put((address, k))
        reply = self.res.get(timeout=600)
        with self.cond:
            self.replies[k] = reply
            self.cond.notify_all()
        return reply

    def wait(self, k: int, timeout_s: float) -> dict:
        with self.cond:
            if not self.cond.wait_for(lambda: k in self.replies, timeout_s):
                raise TimeoutError(f"step {k} not applied within {timeout_s} s")
            return self.replies[k]

    def close(self):
        self.q.put(None)
        self.proc.join(60)


def stub_server(worker: Worker) -> ThreadingHTTPServer:
    """/ping, and /collective_rpc (vLLM's shape) handing the update to the worker."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._answer(200, b"")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            (address,) = body["args"][0].values()
            reply = worker.apply(address)
            ok = reply["error"] is None
            self._answer(200 if ok else 500, b"" if ok else json.dumps(reply).encode())

        def _answer(self, status, data):
            self.send_response(status)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def data_dir(wanted: str, nbytes: int) -> str:
    """``wanted`` when it has room for two steps' files (step k and k-1), else the temp dir."""
    st = os.statvfs(wanted)
    if st.f_bavail * st.f_frsize >= 2.1 * nbytes:
        return wanted
    print(
        f"!! {wanted} has {st.f_bavail * st.f_frsize / 1e9:.1f} GB free, two steps need "
        f"{2.1 * nbytes / 1e9:.1f} GB: the steps are written to {tempfile.gettempdir()}",
        flush=True,
    )
    return tempfile.gettempdir()


def run_watch(a, base, worker, dtype, out: Path) -> list[dict]:
    nbytes = sum(t.nbytes for t in base.values())
    root = Path(data_dir(a.data_dir, nbytes)) / f"ckpt-engine-bench-watch-{os.getpid()}"
    root.mkdir(parents=True)
    server = stub_server(worker)
    json_out = out / "watch-updater.jsonl"
    json_out.unlink(missing_ok=True)  # appended to by the updater: this run's lines only
    cmd = [sys.executable, "-m", "ckpt_engine.update", "--watch", str(root)]
    cmd += ["--endpoint", f"http://127.0.0.1:{server.server_address[1]}", "--device", dtype]
    cmd += ["--inference-parallel-size", "1", "--watch-interval", "0.02", "--timeout", "120"]
    cmd += ["--register-mode", a.register_mode, "--json-out", str(json_out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    log = open(out / "watch-updater.log", "wb")  # noqa: SIM115
    started = time.perf_counter()
    updater = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    trainer = Trainer(base, root / ".trainer")  # hidden: never looked at by the watcher
    steps, up_s = [], None
    try:
        while "watching" not in (out / "watch-updater.log").read_text(errors="replace"):
            if updater.poll() is not None or time.perf_counter() - started > a.step_limit_s:
                raise RuntimeError(f"the updater did not start (exit code {updater.poll()})")
            time.sleep(0.05)
        up_s = time.perf_counter() - started
        print(f"watch: updater up in {up_s:.1f} s", flush=True)
        for k in range(1, a.steps + 1):
            folder = root / f"step-{k}"
            folder.mkdir()
            trainer.files = [(str(folder / Path(p).name), ns) for p, ns in trainer.files]
            trainer.write(k)  # untimed: the trainer's own work
            worker.step = k
            (folder / "COMPLETE").touch()
            marked = time.time()
            reply = worker.wait(k, a.step_limit_s)
            push = updater_line(json_out, f"step-{k}", a.step_limit_s, updater)
            steps.append(record(k, reply["applied"] - marked, reply, push["push_seconds"]))
            steps[-1]["updater_start_s"] = up_s
            shutil.rmtree(root / f"step-{k - 1}", ignore_errors=True)
    finally:
        updater.send_signal(signal.SIGTERM)  # stops after the push in flight: exit 143
        try:
            rc = updater.wait(60)
        except subprocess.TimeoutExpired:
            updater.kill()
            rc = updater.wait()
        log.close()
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print(f"watch: the updater exited {rc} on SIGTERM (143 expected)", flush=True)
    return steps


def updater_line(path: Path, name: str, timeout_s: float, updater: subprocess.Popen) -> dict:
    """The updater's --json-out line of checkpoint ``name`` (written once its push returned)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and updater.poll() is None:
        lines = path.read_text().splitlines() if path.exists() else []
        for line in map(json.loads, lines):
            if line["checkpoint_name"] == name:
                return line
        time.sleep(0.01)
    raise RuntimeError(f"no --json-out line for {name} (updater exit code {updater.poll()})")


def timed_host_copies(seconds: list[float]):
    """Wraps the registry's ``copy_by_torch`` (the host path's device-to-host copies: one per
    tensor, or gathered, ckpt_engine.ps.gather) to append its seconds per call; returns the
    function that restores it."""
    from ckpt_engine.ps import registry

    real = registry.copy_by_torch

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    registry.copy_by_torch = timed
    return lambda: setattr(registry, "copy_by_torch", real)


def run_trainer(a, base, worker, dtype, index) -> list[dict]:
    from ckpt_engine import ParameterServer, PSConfig

    ps = ParameterServer(device_type=dtype, config=PSConfig(timeout_s=120.0))
    weights = {n: torch.empty_like(t) for n, t in base.items()}
    steps = []
    copies: list[float] = []
    restore = timed_host_copies(copies)

    def req(socket_paths):
        worker.apply(socket_paths[0][1])

    try:
        for k in range(1, a.steps + 1):
            for n, t in base.items():  # the optimizer step: new values, on the device
                weights[n].copy_(step_bits(t, k))
            harness.sync(dtype, index)
            worker.step = k
            start = time.time()
            if k > 1:
                ps.unregister_checkpoint(f"train-{k - 1}")  # its pinned buffers serve this step
            ps.register_and_update(f"train-{k}", req, named_tensors=weights)
            returned = time.time()  # the host copy is complete too
            reply = worker.wait(k, a.step_limit_s)
            steps.append(record(k, max(reply["applied"], returned) - start, reply, None))
            phases = {p: round(v, 4) for p, v in ps.last_step_timings.items()}
            if copies:  # within ``register``: the host path's device-to-host copies
                phases["host_path_copy"] = round(sum(copies), 4)
                copies.clear()
            steps[-1]["phases"] = phases
            print(f"step {k}: phases {phases}", flush=True)
    finally:
        restore()
        ps.close()
    return steps


def record(k, seconds, reply, push_s) -> dict:
    print(
        f"step {k}: {seconds:.3f} s (updater push {push_s if push_s is None else round(push_s, 3)}"
        f" s), exact {reply['exact']}, error {reply['error']}",
        flush=True,
    )
    return {"step": k, "seconds": seconds, "push_seconds": push_s, **reply}


def summary(steps: list[dict]) -> dict:
    later = [s["seconds"] for s in steps[1:]] or [steps[0]["seconds"]]
    return {
        "first_s": steps[0]["seconds"],
        "median_s": statistics.median(later),
        "min_s": min(later),
        "max_s": max(later),
        "exact": all(s["exact"] for s in steps),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=4, help="steps per mode (the first: pool setup)")
    ap.add_argument("--cpu", action="store_true", help="CPU path (gloo, shared memory)")
    ap.add_argument("--shrink", type=int, default=1, help="divide every dimension (CPU runs)")
    ap.add_argument("--modes", default="watch,trainer", help="comma list of watch, trainer")
    ap.add_argument("--workload", default="dense", choices=("dense", "moe"))
    ap.add_argument("--tensors", type=int, default=50_000, help="moe: at least this many tensors")
    ap.add_argument("--register-mode", default="overlap", choices=("overlap", "separate"))
    ap.add_argument("--data-dir", default="/dev/shm", help="where the trainer writes DIR")
    ap.add_argument("--step-limit-s", type=float, default=120.0)
    ap.add_argument("--limit-s", type=float, default=230.0, help="past it: stacks printed, exit 1")
    a = ap.parse_args()
    faulthandler.dump_traceback_later(a.limit_s, exit=True)
    dtype = "cpu" if a.cpu else "cuda"
    if not a.cpu:
        torch.cuda.set_device(0)
    os.environ["CKPT_ENGINE_DEVICE"] = dtype
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="bench-watch-"))
    spec = workload_spec(a.workload, a.gib, a.shrink, a.tensors)
    dev = harness.device_of(dtype, 0)
    base = {name: gen(i, shape, dev) for i, (name, shape) in enumerate(spec)}
    nbytes = total_bytes(spec)
    start = time.perf_counter()
    worker = Worker(dtype, 0, spec)
    print(f"{nbytes / 1e9:.2f} GB, {len(spec)} tensors; worker ready in "
          f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    results = {}
    try:
        for mode in a.modes.split(","):
            print(f"-- {mode}", flush=True)
            if mode == "watch":
                results[mode] = run_watch(a, base, worker, dtype, out)
            else:
                results[mode] = run_trainer(a, base, worker, dtype, 0)
    finally:
        worker.close()
    device = torch.cuda.get_device_name(0) if dtype == "cuda" else "CPU"
    table = [f"| {device}, {nbytes / 1e9:.2f} GB | first step | later steps: median (min-max) |"]
    table.append("|---|---|---|")
    for mode, steps in results.items():
        s = summary(steps)
        later = f"{s['median_s']:.3f} s ({s['min_s']:.3f}-{s['max_s']:.3f})"
        table.append(f"| {mode} | {s['first_s']:.3f} s | {later}, exact {s['exact']} |")
    if results.get("watch"):
        up = results["watch"][0]["updater_start_s"]
        table.append(
            f"| (updater start, once; a per-step updater pays it every step) | {up:.1f} s | |"
        )
    (out / "watch.json").write_text(json.dumps({"bytes": nbytes, "results": results}, indent=1))
    print("\n".join(table), flush=True)
    return 0 if all(summary(v)["exact"] for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
