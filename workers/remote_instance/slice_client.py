"""The client's side of slice mode (`slices`): whether it applies and its plan, then receiving,
per parameter, the pieces this rank keeps over its pair group.

Each piece lands in place in the parameter (a strided one, a column shard, through a buffer),
padding rows are zeroed; a parameter planned whole arrives as its checkpoint tensors, in the
seed's layout order, and loads through `load_weights`. The count of bytes received is exact
(the loader logs it per rank)."""

from __future__ import annotations

import logging
import math

import torch

from ckpt_engine.progress import Progress
from workers.errors import RemoteInstanceError, TransferError
from workers.remote_instance.manifest import Manifest
from workers.remote_instance.reads import layout_from_json
from workers.remote_instance.slices import (
    ParamSlices,
    SliceRequest,
    at_rank,
    client_targets,
    layouts_of,
    plan_digest,
    plan_slices,
    span_numel,
    zero_padding,
)

logger = logging.getLogger(__name__)


def slice_plan(model, seed: Manifest) -> tuple[list[ParamSlices] | None, SliceRequest | None]:
    """Slice mode's plan and the init call's request, where it applies: another TP size, a seed
    that lists its layouts, the same parameters on both sides; else (None, None): full mode."""
    tp = model.tp
    if seed.layouts is None or seed.tp_size == tp.size:
        return None, None
    order = [p.name for p in seed.parameters]
    named = list(model.named_parameters())
    if set(order) != {n for n, _ in named}:
        logger.info("rank %d: the seed's parameters are not ours: full mode", tp.rank)
        return None, None
    mine = layouts_of(named)
    plans = plan_slices(order, seed.layouts, seed.tp_size, mine, tp.size)
    return plans, SliceRequest(tp_size=tp.size, layouts=mine, digest=plan_digest(plans))


def receive_slices(model, group, seed: Manifest, plans, device, *, where: str) -> int:
    """Receive every parameter's pieces (in `plans` order, as the seed sends them); returns the
    bytes received. `where`: the seed's URL, for errors and progress."""
    j = model.tp.rank
    params = dict(model.named_parameters())

    def nbytes(plan: ParamSlices) -> int:
        param = params[plan.name]
        if plan.whole:
            shapes = _whole_shapes(seed, plan.name).values()
            return sum(math.prod(shape) for shape in shapes) * param.element_size()
        shape = tuple(param.shape)
        return sum(span_numel(sp, shape) for sp in plan.per_rank[j].spans) * param.element_size()

    progress = Progress(f"fork from {where}", sum(map(nbytes, plans)), rank=j)
    received = 0
    for k, plan in enumerate(plans):
        data = params[plan.name].data
        try:
            if plan.whole:
                for name, shape in _whole_shapes(seed, plan.name, model).items():
                    target = torch.empty(shape, dtype=data.dtype, device=device)
                    group.recv(target)
                    model.load_weights([(name, target)])
            else:
                for buf, dst in client_targets(plan.per_rank[j], data):
                    group.recv(buf)
                    if dst is not None:
                        dst.copy_(buf)
                zero_padding(plan.per_rank[j], data)
        except (TransferError, RuntimeError) as e:
            progress.close()
            raise RemoteInstanceError(
                f"fork from seed {where} broke at {plan.name} ({k + 1} of {len(plans)} parameters) "
                f"on port {group.name}: {e}"
            ) from e
        n = nbytes(plan)
        received += n
        progress.advance(n)
    progress.close()
    try:
        group.flush()
    except (TransferError, RuntimeError) as e:
        raise RemoteInstanceError(f"fork from seed {where}: {e}") from e
    return received


def _whole_shapes(seed: Manifest, pname: str, model=None) -> dict:
    """A parameter sent whole: {checkpoint name (with `model`, else shard id): full shape}, in
    the seed's send order (its layout's parts)."""
    layout = at_rank(layout_from_json(seed.layouts[pname]), 0)
    return {
        (sid if model is None else model.checkpoint_name(pname, sid)): layout.full_shape(sid)
        for sid in layout.shard_ids()
    }
