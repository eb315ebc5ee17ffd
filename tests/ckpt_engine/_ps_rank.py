"""One parameter-server rank of a multi-process test, with its own worker process.

Run as ``python _ps_rank.py <spec.json>`` under a torchrun-like environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT, ...). Writes ``rank<r>.json`` with one record per step.
The worker process rebuilds every rank's tensors from the seed and checks each byte it receives.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from ckpt_engine import CheckpointMetas, ParameterServer, PSConfig, UpdateError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _tensors  # noqa: E402


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _device_bytes(ps) -> int:
    import torch

    return torch.cuda.memory_allocated(ps.device_index) if ps.device_type == "cuda" else 0


def shm_entries(token: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if token in n)


def worker_main(conn, device_index: int, spec: dict) -> None:
    """The inference side: applies updates when told to, checking every tensor bit-exactly."""
    import torch
    import zmq

    from ckpt_engine import update_weights_from_ipc

    world = int(spec["world_size"])
    expected = _tensors.all_expected(
        spec["seed"], world, big_bytes=spec["big_bytes"], tiny=spec["tiny"]
    )
    while conn.poll(300):
        try:
            cmd = conn.recv()
        except EOFError:
            break
        if cmd["op"] == "exit":
            break
        seen: dict[str, int] = {}
        calls = {"run": 0, "post_hook": 0}

        def run(weights, cmd=cmd, seen=seen, calls=calls):
            bucket = calls["run"]
            calls["run"] += 1
            if cmd.get("fail_at") == bucket:
                raise ValueError(f"injected failure at bucket {bucket}")
            if cmd.get("die_at") == bucket:
                os._exit(17)
            if cmd.get("kill_ps_at") == bucket:
                os.kill(os.getppid(), signal.SIGKILL)
            if cmd.get("kill_pids_at") == bucket:  # e.g. the owners of a P2P update
                for pid in cmd["pids"]:
                    os.kill(pid, signal.SIGKILL)
            for name, tensor in weights:
                if name in seen:
                    raise AssertionError(f"{name} delivered twice")
                if not _tensors.same_bits(tensor, expected[name]):
                    raise AssertionError(f"{name} differs from what the rank registered")
                seen[name] = 1

        def post_hook(calls=calls):
            calls["post_hook"] += 1

        def validate(manifest):
            if {m.name for m in manifest} != set(expected):
                raise AssertionError("manifest does not list exactly the expected tensors")

        reply: dict = {"ok": True}
        ctx = zmq.Context()  # per update, so that fd counts settle when it is terminated
        try:
            update_weights_from_ipc(
                ctx,
                cmd["address"],
                device_index,
                run=run,
                post_hook=post_hook,
                validate=validate,
                wire=spec.get("wire"),
            )
            if len(seen) != len(expected) or calls["post_hook"] != 1:
                reply = {"ok": False, "error": f"saw {len(seen)}/{len(expected)}, {calls}"}
        except Exception as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        finally:
            ctx.term()
        reply.update(fds=_fds(), rss=_rss_bytes(), runs=calls["run"])
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            break
    del torch


class Worker:
    def __init__(self, device_index: int, spec: dict) -> None:
        mpctx = mp.get_context("spawn")
        self.conn, child = mpctx.Pipe()
        self.proc = mpctx.Process(target=worker_main, args=(child, device_index, spec), daemon=True)
        self.proc.start()
        child.close()
        self.last_reply: dict | None = None

    def request(self, cmd: dict, timeout_s: float) -> dict:
        self.conn.send(cmd)
        if not self.conn.poll(timeout_s):
            raise TimeoutError("worker did not answer")
        self.last_reply = self.conn.recv()  # EOFError if the worker died
        return self.last_reply

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send({"op": "exit"})
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def push(ps, req_func, files: list[Path], named: dict) -> dict:
    """``register_and_update("pushed", ...)`` of this rank's files and of its named tensors on
    its own device (read by the update where they are: ckpt_engine.ps.direct); then whether the
    host copy holds every named tensor's bytes and whether any deferred state is left, and
    "pushed" unregistered again."""
    import torch

    device = torch.device(ps.device_type, ps.device_index if ps.device_type == "cuda" else None)
    on_device = {n: t.to(device) for n, t in named.items()}
    ps.register_and_update(
        "pushed", req_func, files=[str(f) for f in files], named_tensors=on_device
    )
    ckpt = ps.checkpoint("pushed")
    host_exact = all(_tensors.same_bits(ckpt.get_tensor(n), t) for n, t in named.items())
    left = ckpt.pending
    ps.unregister_checkpoint("pushed")
    direct = "host_copy" in ps.last_step_timings  # named tensors read where they are
    return {"host_exact": host_exact, "pending_left": left, "direct": direct}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.WARNING, format=f"[rank{rank}] %(name)s: %(message)s")
    out = Path(spec["out_dir"])
    records: list[dict] = []

    def record(**kw) -> None:
        records.append(kw)
        tmp = out / f".rank{rank}.json.tmp"
        tmp.write_text(json.dumps(records))
        os.replace(tmp, out / f"rank{rank}.json")

    file_a, file_b, named = _tensors.rank_tensors(
        spec["seed"], rank, big_bytes=spec["big_bytes"], tiny=spec["tiny"]
    )
    path_a = Path(spec["shm_data_dir"]) / f"r{rank}-a.safetensors"  # pinned in place
    path_b = Path(spec["data_dir"]) / f"r{rank}-b.safetensors"  # read into host memory
    save_file(file_a, str(path_a))
    save_file(file_b, str(path_b))

    config = PSConfig(bucket_bytes=spec["bucket_bytes"], timeout_s=spec["timeout_s"])
    ps = ParameterServer(config=config)
    ps.register_checkpoint("ckpt", files=[str(path_a), str(path_b)], named_tensors=named)
    metas = ps.gather_metas("ckpt")
    metas.save(out / f"metas{rank}.json")
    loaded = CheckpointMetas.load(out / f"metas{rank}.json")
    ps.load_metas(loaded)
    record(op="register", ok=loaded == metas, tensors=metas.num_tensors, run_id=ps.run_id)

    worker = Worker(ps.device_index, spec)
    try:
        for step in spec["steps"]:
            if step["op"] == "respawn":
                if not worker.proc.is_alive():
                    worker = Worker(ps.device_index, spec)
                record(op="respawn", ok=True)
                continue
            inject = step.get("inject") or {}
            mine = inject.get("rank") == rank
            cmd: dict = {"op": "update"}
            if mine and inject["kind"] in ("fail_at", "die_at", "kill_ps_at"):
                cmd[inject["kind"]] = inject["bucket"]

            def req_func(socket_paths, cmd=cmd, mine=mine, inject=inject, worker=worker):
                if mine and inject["kind"] == "req_func_raises":
                    raise RuntimeError("injected req_func failure")
                reply = worker.request({**cmd, "address": dict(socket_paths)[ps.device_key]}, 120)
                if not reply["ok"]:
                    raise RuntimeError(f"worker: {reply['error']}")

            for _ in range(step.get("repeat", 1)):
                start = time.monotonic()
                try:
                    if step["op"] == "register_and_update":
                        result: dict = {"ok": True, **push(ps, req_func, [path_a, path_b], named)}
                    else:
                        ps.update("ckpt", req_func, wire=spec.get("wire", "ckpt-engine"))
                        result = {"ok": True}
                except UpdateError as e:
                    result = {
                        "ok": False,
                        "type": type(e).__name__,
                        "rank": e.rank,
                        "bucket": e.bucket,
                        "message": e.message,
                        "summary": str(e),
                        "untouched": e.untouched,
                    }
                result["pushed_registered"] = "pushed" in ps.registered_checkpoints()
                result["elapsed"] = time.monotonic() - start
                result["worker"] = worker.last_reply
                result["usage"] = {
                    "fds": _fds(),
                    "rss": _rss_bytes(),
                    "shm": len(shm_entries(ps.run_id)),
                    "sockets": len(os.listdir(ps._socket_dir.path)),
                    "device": _device_bytes(ps),
                }
                record(op="update", **result, step=step.get("step"))
    finally:
        worker.stop()
    run_id = ps.run_id
    ps.close()
    record(op="close", ok=True, leftover_shm=shm_entries(run_id))


if __name__ == "__main__":
    main()
