"""What one update needs to know (UpdateContext), and the pure pieces of an update: local
consistency checks and the choice of bucket size (the error every rank raises: ps/outcome.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ckpt_engine.channel import SocketDir
from ckpt_engine.errors import MetasError
from ckpt_engine.metas import CheckpointMetas
from ckpt_engine.planner import ALIGN, BucketPlan, largest_tensor_bytes, plan_buckets
from ckpt_engine.ps.collectives import ControlGroup
from ckpt_engine.ps.config import PSConfig
from ckpt_engine.ps.registry import RegisteredCheckpoint


@dataclass(kw_only=True)
class UpdateContext:
    name: str
    update_no: int
    run_id: str
    rank: int
    world_size: int
    device_type: str
    device_index: int
    device_key: str
    control: ControlGroup
    data_group: Any
    socket_dir: SocketDir
    config: PSConfig
    timeout_s: float
    metas: CheckpointMetas | None
    checkpoint: RegisteredCheckpoint | None
    # The last plan per checkpoint name, (metas, bucket_bytes, plan, largest tensor's bytes):
    # metas are immutable, so the same metas object and bucket size give the same plan
    # (ParameterServer keeps it).
    plan_cache: dict[str, tuple[CheckpointMetas, int, BucketPlan, int]] | None = None


def check_local(ctx: UpdateContext) -> None:
    """This rank's share of the metas must be exactly what it has registered."""
    metas = ctx.metas
    if metas is None:
        raise MetasError(f"no metas for {ctx.name!r}: call gather_metas or load_metas first")
    if metas.world_size != ctx.world_size:
        raise MetasError(f"metas are for {metas.world_size} ranks, the job has {ctx.world_size}")
    mine = metas.ranks[ctx.rank]
    if not mine.tensors:
        return
    if ctx.checkpoint is not None and ctx.checkpoint.checked_metas is metas:
        return  # both immutable: checked at an earlier update
    if ctx.checkpoint is None:
        raise MetasError(
            f"metas give this rank {len(mine.tensors)} tensors of {ctx.name!r}, "
            "but it has not registered that checkpoint"
        )
    have = {t.name: t for t in ctx.checkpoint.tensors}
    for t in mine.tensors:
        if have.get(t.name) != t:
            raise MetasError(f"registered tensor differs from the metas: {have.get(t.name)} vs {t}")
    sizes = tuple(b.nbytes for b in ctx.checkpoint.buffers)
    if sizes != mine.buffer_bytes:
        raise MetasError(
            f"registered buffer sizes {sizes} differ from the metas' {mine.buffer_bytes}"
        )
    ctx.checkpoint.checked_metas = metas


def choose_plan(
    metas: CheckpointMetas,
    config: PSConfig,
    min_free: int,
    cache: dict[str, tuple[CheckpointMetas, int, BucketPlan, int]] | None = None,
) -> BucketPlan:
    """Buckets no larger than the configured size nor the memory budget (same on every rank).

    With ``cache``, the plan of the same metas object and bucket size is reused (planning
    10^5 tensors takes a noticeable fraction of a second)."""
    per_slot = int(min_free * config.device_memory_fraction) // config.num_slots
    per_slot = per_slot // ALIGN * ALIGN
    hit = cache.get(metas.name) if cache is not None else None
    if hit is not None and hit[0] is not metas:
        hit = None
    need = hit[3] if hit is not None else max(largest_tensor_bytes(metas), ALIGN)
    if per_slot < need:
        raise ValueError(
            f"not enough free memory for the IPC buffer: {config.num_slots} slots of at least "
            f"{need} bytes (the largest tensor) needed, {per_slot} bytes available per slot"
        )
    bucket_bytes = min(config.bucket_bytes, per_slot)
    if hit is not None and hit[1] == bucket_bytes:
        return hit[2]
    plan = plan_buckets(metas, bucket_bytes=bucket_bytes)
    if cache is not None:
        cache[metas.name] = (metas, bucket_bytes, plan, need)
    return plan
