"""One rank of a P2P test job (``python _p2p_rank.py <spec.json> owner|receiver``), under a
torchrun-like environment.

owner: registers its test tensors (as _ps_rank.py does), gathers the metas (this starts serving
them), rank 0 saves them to ``metas.json``, records ``ready``, then serves until its stdin
closes (the test holds it), unregisters, closes.
receiver: a fresh parameter server holding nothing; per step, loads a metas file and runs
``update(..., ranks=spec["ranks"])`` into its own worker process (_ps_rank.worker_main, which
checks every byte against the owners' tensors); records each result in ``recv<rank>.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from ckpt_engine import CheckpointMetas, ParameterServer, PSConfig, UpdateError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _ps_rank  # noqa: E402
import _tensors  # noqa: E402


def _recorder(path: Path):
    records: list[dict] = []

    def record(**kw) -> None:
        records.append(kw)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records))
        os.replace(tmp, path)

    return record


def owner(spec: dict, rank: int) -> None:
    out = Path(spec["out_dir"])
    record = _recorder(out / f"owner{rank}.json")
    file_a, file_b, named = _tensors.rank_tensors(
        spec["seed"], rank, big_bytes=spec["big_bytes"], tiny=spec["tiny"]
    )
    path_a = Path(spec["shm_data_dir"]) / f"r{rank}-a.safetensors"
    path_b = Path(spec["data_dir"]) / f"r{rank}-b.safetensors"
    save_file(file_a, str(path_a))
    save_file(file_b, str(path_b))
    ps = ParameterServer(config=PSConfig(p2p_host="127.0.0.1"))
    ps.register_checkpoint("ckpt", files=[str(path_a), str(path_b)], named_tensors=named)
    metas = ps.gather_metas("ckpt")
    if rank == 0:
        metas.save(out / "metas.json")
    record(op="ready", run_id=ps.run_id, pid=os.getpid())
    sys.stdin.read()  # serve until the test closes our stdin
    ps.unregister_checkpoint("ckpt")
    ps.close()
    record(op="closed")


def receiver(spec: dict, rank: int) -> None:
    out = Path(spec["out_dir"])
    record = _recorder(out / f"recv{rank}.json")
    config = PSConfig(bucket_bytes=spec["bucket_bytes"], timeout_s=spec["timeout_s"])
    ps = ParameterServer(config=config)
    record(op="start", run_id=ps.run_id)
    worker = _ps_rank.Worker(ps.device_index, {**spec, "world_size": spec["owner_world"]})
    try:
        for step in spec["steps"]:
            ps.load_metas(CheckpointMetas.load(step["metas"]))
            cmd = {"op": "update", **step.get("worker", {})}

            def req_func(socket_paths, cmd=cmd):
                reply = worker.request({**cmd, "address": dict(socket_paths)[ps.device_key]}, 120)
                if not reply["ok"]:
                    raise RuntimeError(f"worker: {reply['error']}")

            start = time.monotonic()
            try:
                ps.update("ckpt", req_func, ranks=step.get("ranks", spec["ranks"]))
                result: dict = {"ok": True}
            except UpdateError as e:
                result = {
                    "ok": False,
                    "type": type(e).__name__,
                    "summary": str(e),
                    "untouched": e.untouched,
                }
            result.update(
                elapsed=time.monotonic() - start,
                worker=worker.last_reply,
                timings=ps.last_update_timings,
            )
            record(op="update", step=step["step"], **result)
    finally:
        worker.stop()
    ps.close()
    record(op="close", leftover_shm=_ps_rank.shm_entries(ps.run_id))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ["RANK"])
    role = sys.argv[2]
    logging.basicConfig(level=logging.WARNING, format=f"[{role}{rank}] %(name)s: %(message)s")
    {"owner": owner, "receiver": receiver}[role](spec, rank)


if __name__ == "__main__":
    main()
