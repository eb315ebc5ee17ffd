"""Slice mode of a fork over a pair-group backend (gloo, NCCL) at different TP sizes: each client
rank receives only the rows/columns it keeps of each parameter (pure planning).

Inputs: the seed's layouts (its manifest's `layouts`: rank 0's; a rank's layout differs only in
`rank`) and the client's (sent with the init call as a `SliceRequest`). Per parameter and client
rank, `reads.plan_spans` -- the row selection the transfer_engine backend reads by -- gives the
spans; each span crosses the client rank's pair group as one piece, in plan order:

- a span along dim 0 is one contiguous range of the row-major parameter: sent from it and
  received into it in place, no copy;
- a span along a later dim (row-parallel weights: a column shard) is strided: the seed packs it
  into one contiguous piece (one copy on its device) and the client copies it into place. Packed,
  not whole: the copy costs a pass over device memory, the whole tensor TP times the link bytes;
- padding rows (a vocabulary that does not divide by the TP size) are zeroed by the client,
  never sent.

A parameter the client reported no layout for, or whose two layouts do not correspond (other
parts, other TP dim), goes whole (`ParamSlices.whole`): the seed sends its checkpoint tensors,
the client loads them through `load_weights` (full mode's path, for that parameter only).

Client rank j is served by seed rank `plan.server_of(j)`, which the spans prefer where a piece
is replicated over seed ranks; with a client TP size that is a multiple of the seed's, every
piece lies on the serving rank. Where a span of a client lies on another seed rank (e.g. a TP=2 seed, a TP=1 client: half of each sharded parameter is
on the other seed rank), the seed's TP group all-gathers that parameter first (`gather`: every
seed rank derives the same flag from the same plan, so the collective stays matched), as full
mode gathers every tensor; a TP=1 seed never gathers.

Both sides compute the plan from the same inputs; the client sends its digest with the init
call and the seed refuses the init if its own differs, so the two ends never disagree on the
size of a piece.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_engine.json_depth import format_path, too_deep
from workers.errors import ProtocolError
from workers.layers.sharding import ShardLayout, StackedLayout
from workers.remote_instance.plan import server_of
from workers.remote_instance.reads import (
    LayoutMismatch,
    SpanPlan,
    layout_from_json,
    layout_to_json,
    plan_spans,
)

SLICE_FORMAT = 1
# layout_to_json's deepest: stacked {"inner": {"parts": [[id, [shape], chunks]]}}
LAYOUT_MAX_DEPTH = 5
Layout = ShardLayout | StackedLayout


def at_rank(layout: Layout, rank: int) -> Layout:
    """`layout` as TP rank `rank` of the same size holds it."""
    if isinstance(layout, StackedLayout):
        return dataclasses.replace(layout, inner=at_rank(layout.inner, rank))
    return dataclasses.replace(layout, rank=rank)


def layouts_of(named_params: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """{parameter name: layout JSON, as rank 0 holds it} of the parameters that carry one."""
    out = {}
    for name, param in named_params:
        layout = getattr(param, "shard_layout", None)
        if layout is not None:
            out[name] = layout_to_json(at_rank(layout, 0))
    return out


@dataclass(frozen=True)
class ParamSlices:
    """One parameter: per client rank the spans it receives (None for all: whole)."""

    name: str
    per_rank: tuple[SpanPlan | None, ...]
    gather: bool  # the seed all-gathers it over its TP group first

    @property
    def whole(self) -> bool:
        return self.per_rank[0] is None


def plan_slices(
    order: list[str],
    seed_layouts: dict[str, Any],
    seed_tp: int,
    client_layouts: dict[str, Any],
    client_tp: int,
) -> list[ParamSlices]:
    """The slice plan of every parameter in `order` (the seed's send order); layouts as JSON,
    rank 0's (`layouts_of`)."""
    server = [server_of(j, seed_tp, client_tp) for j in range(client_tp)]
    out = []
    for name in order:
        try:
            seed = layout_from_json(seed_layouts[name])
        except KeyError:
            raise ProtocolError(f"the seed's layouts lack parameter {name}") from None
        try:
            client = layout_from_json(client_layouts[name])
            if client.dim is not None and _size(client) != client_tp:
                raise LayoutMismatch(f"{name}: a layout of TP size {_size(client)}")
            seeds = [at_rank(seed, i) for i in range(seed_tp)]
            per_rank = tuple(
                plan_spans(name, at_rank(client, j), seeds, client_rank=j, prefer=server[j])
                for j in range(client_tp)
            )
        except (KeyError, LayoutMismatch, ValueError):
            sharded = seed_tp > 1 and seed.dim is not None
            out.append(ParamSlices(name, (None,) * client_tp, gather=sharded))
            continue
        gather = any(sp.seed_rank != server[j] for j, p in enumerate(per_rank) for sp in p.spans)
        out.append(ParamSlices(name, per_rank, gather))
    return out


def _size(layout: Layout) -> int:
    return layout.inner.size if isinstance(layout, StackedLayout) else layout.size


def span_numel(sp, shape: tuple[int, ...]) -> int:
    """Elements of span `sp` of a parameter of local shape `shape` (the client's)."""
    if sp.dim is None:
        return math.prod(shape)
    return math.prod(shape[: sp.dim]) * sp.length * math.prod(shape[sp.dim + 1 :])


def seed_pieces(
    plan: SpanPlan, data: torch.Tensor, shards: list[torch.Tensor] | None
) -> Iterator[torch.Tensor]:
    """Seed side: the pieces of one client rank, in order, each contiguous (a dim-0 span is a
    view of the parameter; a later dim's is packed by one copy). `data`: this seed rank's
    parameter; `shards`: every seed rank's, when the parameter was gathered."""
    for sp in plan.spans:
        src = data if shards is None else shards[sp.seed_rank]
        piece = src if sp.dim is None else src.narrow(sp.dim, sp.seed_start, sp.length)
        yield piece.contiguous()


def client_targets(
    plan: SpanPlan, data: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Client side, per piece in order: (the tensor to receive it into, where to copy it after,
    or None when it was received in place). Afterwards, `zero_padding`."""
    for sp in plan.spans:
        dst = data if sp.dim is None else data.narrow(sp.dim, sp.client_start, sp.length)
        if dst.is_contiguous():
            yield dst, None
        else:
            yield torch.empty(dst.shape, dtype=dst.dtype, device=dst.device), dst


def zero_padding(plan: SpanPlan, data: torch.Tensor) -> None:
    for z in plan.zeros:
        data.narrow(z.dim, z.start, z.length).zero_()


def plan_digest(plans: list[ParamSlices]) -> str:
    """What both ends must agree on, hashed (names, whole/gather, every span and zero fill)."""
    raw = [
        [p.name, p.gather, [None if r is None else [r.spans, r.zeros] for r in p.per_rank]]
        for p in plans
    ]
    text = json.dumps(raw, default=dataclasses.astuple, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class SliceRequest:
    """The client's half of slice mode, in the init call's `slices` field (versioned): its TP
    size, its layouts (rank 0's) and the digest of the plan it will receive by."""

    tp_size: int
    layouts: dict[str, Any]
    digest: str
    format: int = SLICE_FORMAT

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> SliceRequest:
        if not isinstance(raw, dict):
            raise ProtocolError("slices: expected an object")
        if raw.get("format") != SLICE_FORMAT:
            raise ProtocolError(
                f"slices: format {raw.get('format')!r}, this seed speaks {SLICE_FORMAT}"
            )
        tp, layouts, digest = raw.get("tp_size"), raw.get("layouts"), raw.get("digest")
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ProtocolError(f"slices: tp_size {tp!r} is not a positive integer")
        if not isinstance(layouts, dict) or not all(isinstance(k, str) for k in layouts):
            raise ProtocolError("slices: layouts must map parameter names to layouts")
        for name, layout in layouts.items():
            path = too_deep(layout, LAYOUT_MAX_DEPTH)
            if path is not None:
                raise ProtocolError(
                    f"slices.layouts[{name[:200]!r}]{format_path(path)}: nested deeper than "
                    f"{LAYOUT_MAX_DEPTH} levels (a layout's JSON nests {LAYOUT_MAX_DEPTH} at most)"
                )
        if not isinstance(digest, str):
            raise ProtocolError("slices: digest must be a string")
        if extra := set(raw) - {"format", "tp_size", "layouts", "digest"}:
            raise ProtocolError(f"slices: unknown fields {sorted(extra)}")
        return cls(tp_size=tp, layouts=layouts, digest=digest)
