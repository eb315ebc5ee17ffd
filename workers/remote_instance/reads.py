"""Which bytes of which seed rank's parameters a client rank reads, one-sided (pure).

Each parameter carries a declarative `ShardLayout` (`workers.layers.sharding`): the tensor-
parallel dim, the parts (checkpoint tensors fused into it) and how each part is cut into pieces
over the ranks. From the client rank's layout and the seed's (the seed publishes its layouts,
rank by rank), `plan_parameter` derives, for any pair of TP sizes, the exact ranges to read:

- equal TP sizes: the whole parameter from the seed rank of the same index, one range;
- different TP sizes: for every part, the rows (along the TP dim) this client rank keeps, taken
  from the seed piece(s) that hold them, nothing more. Along dim 0 a row range is contiguous:
  one read per seed piece. Along a later dim (row-parallel weights) each leading index is a
  separate run; runs contiguous on both sides are merged;
- a piece replicated over several seed ranks (KV heads with fewer heads than ranks) is read from
  one of them, spread by client rank; a replicated parameter likewise;
- rows past the end of the tensor (vocabulary padding) are zeroed locally, never read.

Everything is in bytes relative to the parameter's start on each side; the caller adds the
registered addresses. A layout pair that does not correspond (other parts, other dim) raises
`LayoutMismatch` naming the parameter.

Fused MoE experts (`StackedLayout`: one inner layout per expert, stacked along dim 0) are planned
as their inner layout, one dim further: a span covers every expert at once (merged where
contiguous, so equal TP sizes still read one range).

The row selection itself is `plan_spans` (which indices along the TP dim of which seed rank's
parameter); `plan_parameter` turns its spans into byte ranges. The fork's slice mode over
gloo/NCCL (`slices`) sends the same spans as pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from workers.layers.sharding import Part, ShardLayout, StackedLayout


class LayoutMismatch(ValueError):
    """The seed's and the client's layouts of one parameter do not correspond."""


@dataclass(frozen=True)
class Read:
    seed_rank: int
    remote: int  # byte offset in the seed rank's parameter
    local: int  # byte offset in the client's parameter
    nbytes: int


@dataclass(frozen=True)
class Zero:
    dim: int
    start: int
    length: int  # elements along `dim` of the client's parameter to zero


@dataclass(frozen=True)
class ParamPlan:
    reads: tuple[Read, ...]
    zeros: tuple[Zero, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.reads)


def layout_to_json(layout: ShardLayout | StackedLayout) -> dict[str, Any]:
    if isinstance(layout, StackedLayout):
        return {"stacked": layout.count, "inner": layout_to_json(layout.inner)}
    return {
        "dim": layout.dim,
        "parts": [[p.shard_id, list(p.full_shape), p.chunks] for p in layout.parts],
        "rank": layout.rank,
        "size": layout.size,
    }


def layout_from_json(raw: Any) -> ShardLayout | StackedLayout:
    """A layout from its JSON (`layout_to_json`); LayoutMismatch when malformed. A stacked
    layout's inner one is a plain layout (never stacked again): no recursion on the input."""
    if isinstance(raw, dict) and "stacked" in raw:
        try:
            inner = raw["inner"]
            if isinstance(inner, dict) and "stacked" in inner:
                raise ValueError("a stacked layout's inner layout is stacked again")
            return StackedLayout(int(raw["stacked"]), _shard_layout(inner))
        except (KeyError, TypeError, ValueError) as e:
            raise LayoutMismatch(f"malformed stacked layout: {e}") from None
    return _shard_layout(raw)


def _shard_layout(raw: Any) -> ShardLayout:
    try:
        parts = tuple(
            Part(_shard_id(sid), tuple(int(x) for x in shape), int(c))
            for sid, shape, c in raw["parts"]
        )
        dim = raw["dim"]
        return ShardLayout(
            dim=None if dim is None else int(dim),
            parts=parts,
            rank=int(raw["rank"]),
            size=int(raw["size"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise LayoutMismatch(f"malformed layout: {e}") from None


def _shard_id(sid: Any) -> str | int | None:
    """A plain layout's shard ids are names, numbers or None (`layout_to_json`)."""
    if sid is not None and not isinstance(sid, str | int):
        raise TypeError(f"a shard id is a string, an integer or null, not {type(sid).__name__}")
    return sid


def _offsets(layout: ShardLayout) -> dict[Any, int]:
    out, offset = {}, 0
    for part in layout.parts:
        out[part.shard_id] = offset
        offset += layout.piece_len(part)
    return out


def _check(name: str, client: ShardLayout, seed: ShardLayout) -> None:
    if client.dim != seed.dim:
        raise LayoutMismatch(f"{name}: TP dim {seed.dim} on the seed, {client.dim} here")
    ours = [(p.shard_id, p.full_shape) for p in client.parts]
    theirs = [(p.shard_id, p.full_shape) for p in seed.parts]
    if ours != theirs:
        raise LayoutMismatch(f"{name}: parts {theirs} on the seed, {ours} here")


@dataclass(frozen=True)
class Span:
    """Indices ``[seed_start, seed_start + length)`` along ``dim`` of seed rank ``seed_rank``'s
    parameter are indices ``[client_start, ...)`` along the same dim of the client's; every
    other dim is taken whole. ``dim`` None: the whole parameter (replicated, or one stacked)."""

    seed_rank: int
    dim: int | None
    seed_start: int
    client_start: int
    length: int


@dataclass(frozen=True)
class SpanPlan:
    """What client rank keeps of one parameter, as spans of the seed ranks' parameters, and
    the padding it zeroes locally (nothing to read)."""

    spans: tuple[Span, ...]
    zeros: tuple[Zero, ...]


def plan_spans(
    name: str,
    client: ShardLayout | StackedLayout,
    seed_layouts: list[ShardLayout | StackedLayout],
    *,
    client_rank: int,
    prefer: int | None = None,
) -> SpanPlan:
    """The row selection: which indices (along the TP dim) of which seed rank's parameter give
    client TP rank ``client_rank`` its parameter ``name`` (``seed_layouts[i]``: seed rank i's
    layout of it). `plan_parameter` turns it into byte ranges (one-sided reads); the fork's
    slice mode sends each span as one piece (`slices`). A piece replicated over several seed
    ranks is taken from one of them, spread by client rank, or from seed rank `prefer` when it
    holds that piece (the fork's serving seed rank: no gather)."""
    if isinstance(client, StackedLayout) or isinstance(seed_layouts[0], StackedLayout):
        return _spans_stacked(name, client, seed_layouts, client_rank=client_rank, prefer=prefer)
    s, c, j = len(seed_layouts), client.size, client_rank
    seed = seed_layouts[0]
    _check(name, client, seed)
    if client.dim is None:  # replicated: the whole tensor, from one seed rank
        return SpanPlan((Span(j % s if prefer is None else prefer, None, 0, 0, 0),), ())
    d = client.dim
    off_c, off_s = _offsets(client), _offsets(seed)
    spans: list[Span] = []
    zeros: list[Zero] = []
    for part_c, part_s in zip(client.parts, seed.parts, strict=True):
        full = part_c.full_shape[d]
        n_c, n_s = client.piece_len(part_c), seed.piece_len(part_s)
        start = (j * part_c.chunks // c) * n_c
        length = max(0, min(n_c, full - start))
        if length < n_c:
            zeros.append(Zero(d, off_c[part_c.shard_id] + length, n_c - length))
        step = s // part_s.chunks  # seed ranks holding each seed piece
        for k in range(part_s.chunks):
            a, b = max(start, k * n_s), min(start + length, (k + 1) * n_s, full)
            if a < b:
                rank = k * step + j % step
                if prefer is not None and prefer // step == k:
                    rank = prefer
                seed_row = off_s[part_s.shard_id] + a - k * n_s
                spans.append(Span(rank, d, seed_row, off_c[part_c.shard_id] + a - start, b - a))
    return SpanPlan(tuple(spans), tuple(zeros))


def _spans_stacked(name, client, seed_layouts, *, client_rank: int, prefer=None) -> SpanPlan:
    """Fused experts: the inner layout's spans, one dim further (every expert at once)."""
    if not all(isinstance(x, StackedLayout) for x in (client, *seed_layouts)):
        raise LayoutMismatch(f"{name}: stacked (experts) on one side only")
    if any(x.count != client.count for x in seed_layouts):
        raise LayoutMismatch(
            f"{name}: {seed_layouts[0].count} rows on the seed, {client.count} here"
        )
    inner = plan_spans(
        name, client.inner, [x.inner for x in seed_layouts], client_rank=client_rank, prefer=prefer
    )
    spans = tuple(replace(sp, dim=None if sp.dim is None else sp.dim + 1) for sp in inner.spans)
    zeros = tuple(Zero(z.dim + 1, z.start, z.length) for z in inner.zeros)
    return SpanPlan(spans, zeros)


def plan_parameter(
    name: str,
    client: ShardLayout | StackedLayout,
    seed_layouts: list[ShardLayout | StackedLayout],
    *,
    itemsize: int,
    client_rank: int,
) -> ParamPlan:
    """The reads (and local zero fills) that give client TP rank `client_rank` its parameter
    `name` from the seed ranks (`seed_layouts[i]`: seed rank i's layout of it): the spans of
    `plan_spans` as byte ranges of row-major parameters."""
    plan = plan_spans(name, client, seed_layouts, client_rank=client_rank)
    shape_c, shape_s = client.local_shape(), seed_layouts[0].local_shape()
    reads: list[Read] = []
    runs: list[tuple[Span, int, int, int]] = []  # (span, rows here, rows on the seed, bytes/row)
    for sp in plan.spans:
        if sp.dim is None:
            nbytes = math.prod(shape_c) * itemsize
            if nbytes:
                reads.append(Read(sp.seed_rank, 0, 0, nbytes))
            continue
        d = sp.dim
        unit = math.prod(shape_c[d + 1 :]) * itemsize  # bytes of one index along d
        if sp.length == shape_s[d] == shape_c[d]:  # the whole parameter on both sides
            reads.append(Read(sp.seed_rank, 0, 0, math.prod(shape_c) * itemsize))
            continue
        runs.append((sp, shape_c[d], shape_s[d], unit))
    # Dim 0: one range per span; a later dim: one run per leading index, leading index first,
    # so the runs of one index (the parts of a fused parameter, one expert) merge where they
    # are contiguous on both sides.
    leading = math.prod(shape_c[: runs[0][0].dim]) if runs else 0  # one TP dim per parameter
    for t in range(leading):
        for sp, rows_c, rows_s, unit in runs:
            remote = (t * rows_s + sp.seed_start) * unit
            local = (t * rows_c + sp.client_start) * unit
            reads.append(Read(sp.seed_rank, remote, local, sp.length * unit))
    return ParamPlan(tuple(_merge(reads)), plan.zeros)


def _merge(reads: list[Read]) -> list[Read]:
    out: list[Read] = []
    for r in reads:
        last = out[-1] if out else None
        if (
            last is not None
            and last.seed_rank == r.seed_rank
            and last.remote + last.nbytes == r.remote
            and last.local + last.nbytes == r.local
        ):
            out[-1] = Read(r.seed_rank, last.remote, last.local, last.nbytes + r.nbytes)
        else:
            out.append(r)
    return out
