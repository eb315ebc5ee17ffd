"""``--json-out FILE``: one JSON line per update per rank, for RL orchestrators.

Every rank appends its own line (``O_APPEND``, one ``write`` per line, so the lines of several
ranks on one host never interleave; ``-`` prints to stdout instead), on success and on failure:

    {"schema": "ckpt-engine.update/v1", "time": <unix s>, "rank": 0, "world_size": 2,
     "result": "ok" | "failed", "error": null | "<cause, naming the failed rank(s)>",
     "checkpoint_name": ..., "weight_version": ..., "update_method": "broadcast" | "p2p",
     "inference_api": ..., "endpoint": <this rank's server>,
     "bytes": <whole checkpoint>, "tensors": <whole checkpoint>, "rank_bytes": <this rank's share>,
     "buckets": <buckets of the update, null for p2p>, "split": "files" | "tensors" | "p2p",
     "seconds": {phase: this rank's seconds}, "slowest_seconds": {phase: the slowest rank's},
     "update_phases": {phase: seconds inside the parameter server's update (broadcast)},
     "p2p_read_bytes": <p2p: bytes this rank read from the owners, else null>,
     "p2p_sharded": <p2p: true when each rank read only the rows its worker keeps, else null>}

Phases are the updater's steps (register, ready, gather, [pause], update, [resume]); a failed
update has the phases that ran, and figures it did not reach are null.

With ``--watch`` (updater/watch.py) there is one line per rank per checkpoint pushed or refused
(the ready step is not repeated; ``prepare`` is the split, every file's header checked), with
``checkpoint_name`` and (where the API carries one) ``weight_version`` = the checkpoint's folder
name, and three more keys:

    "push_seconds": <this rank's seconds for the whole push, prepare to the pool trimmed>,
    "since_complete_seconds": <from the marker's mtime to the end of the push: what the
                               training loop waits for, the poll interval included>,
    "watch": {"directory": DIR, "push": <n-th push of this watcher>, "skipped": [superseded]},
    "pool": {"held_bytes": <host memory of the pool: registered + free>, "allocated_bytes":
             <bytes ever allocated by it>, "buffers_allocated", "buffers_reused", "freed_bytes":
             <freed after this push: buffers the new checkpoint did not need>}
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

SCHEMA = "ckpt-engine.update/v1"


def update_record(
    *,
    args: Any,
    rank: int,
    world_size: int,
    endpoint: str,
    seconds: dict[str, float],
    slowest: dict[str, float],
    result: dict[str, Any] | None,
    rank_bytes: int | None,
    update_timings: dict[str, float | int],
    error: BaseException | None,
) -> dict[str, Any]:
    result = result or {}
    return {
        "schema": SCHEMA,
        "time": time.time(),
        "rank": rank,
        "world_size": world_size,
        "result": "ok" if error is None else "failed",
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "checkpoint_name": args.checkpoint_name,
        "weight_version": args.weight_version,
        "update_method": args.update_method,
        "inference_api": args.inference_api,
        "endpoint": endpoint,
        "bytes": result.get("bytes"),
        "tensors": result.get("tensors"),
        "rank_bytes": rank_bytes,
        "buckets": update_timings.get("buckets_n"),
        "split": result.get("split"),
        "seconds": dict(seconds),
        "slowest_seconds": dict(slowest),
        "update_phases": {k: v for k, v in update_timings.items() if isinstance(v, float)},
        "p2p_read_bytes": update_timings.get("p2p_read_bytes"),
        "p2p_sharded": (
            None if "p2p_sharded" not in update_timings else bool(update_timings["p2p_sharded"])
        ),
    }


def write_json_line(path: str, record: dict[str, Any]) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    if path == "-":
        sys.stdout.buffer.write(line)
        sys.stdout.flush()
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def result_of(job: Any, metas: Any, split: str) -> dict[str, Any]:
    """Rank 0's summary of one update (printed, --result-file)."""
    nbytes = metas.nbytes
    return {
        "bytes": nbytes,
        "tensors": metas.num_tensors,
        "ranks": job.ps.world_size,
        "split": split,
        "device": job.ps.device_type,
        "register_s": job.timings["register"],
        "gather_s": job.timings["gather"],
        "update_s": job.timings["update"],
        "update_gb_s": nbytes / job.timings["update"] / 1e9,
    }


def json_line(
    job: Any,
    endpoint: str,
    *,
    result: dict[str, Any] | None,
    rank_bytes: int | None,
    error: Exception | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """--json-out: this rank's line for this update of the updater's ``job`` (none without
    --json-out); ``extra``: more keys (--watch: the push's)."""
    if job is None or job.args.json_out is None:
        return
    record = update_record(
        args=job.args,
        rank=job.rank,
        world_size=job.ps.world_size,
        endpoint=endpoint,
        seconds=job.own_timings,
        slowest=job.timings,
        result=result,
        rank_bytes=rank_bytes,
        update_timings=job.ps.last_update_timings,
        error=error,
    )
    write_json_line(job.args.json_out, {**record, **(extra or {})})


def format_result(r: dict[str, Any]) -> str:
    """Rank 0's printed line."""
    return (
        f"ckpt-engine update: {r['bytes']} bytes ({r['tensors']} tensors, split by "
        f"{r['split']} over {r['ranks']} {r['device']} ranks): register {r['register_s']:.3f} s, "
        f"gather {r['gather_s']:.3f} s, update {r['update_s']:.3f} s "
        f"({r['update_gb_s']:.3f} GB/s)"
    )
