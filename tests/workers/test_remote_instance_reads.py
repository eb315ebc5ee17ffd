"""The one-sided read plan (pure): for every layout kind and pair of TP sizes, executing the
plan byte by byte on the seed ranks' parameters gives exactly the client rank's parameter that
loading the checkpoint tensors would give; equal TP sizes read one range per parameter;
mismatched layouts are named."""

from __future__ import annotations

import itertools

import pytest
import torch

from workers.layers.sharding import Part, ShardLayout, make_param
from workers.remote_instance.reads import (
    LayoutMismatch,
    layout_from_json,
    layout_to_json,
    plan_parameter,
)


def column(rows, cols, chunks=None):  # ColumnParallel: dim 0, one part
    return lambda size: (0, (Part(None, (rows, cols), chunks or size),))


def row(rows, cols):  # RowParallel: dim 1
    return lambda size: (1, (Part(None, (rows, cols), size),))


def qkv(q, kv, cols, kv_heads):  # fused, KV replicated when there are fewer heads than ranks
    def make(size):
        k = min(kv_heads, size)
        return 0, (Part("q", (q, cols), size), Part("k", (kv, cols), k), Part("v", (kv, cols), k))

    return make


LAYOUTS = {
    "column": column(8, 6),
    "row": row(6, 8),
    "fused-qkv-replicated-kv": qkv(8, 4, 6, kv_heads=1),
    "fused-qkv": qkv(8, 4, 6, kv_heads=4),
    "padded-vocab": column(7, 4),  # 7 rows over 2 or 4 ranks: the last rows are padding
    "3d-dim1": lambda size: (1, (Part(None, (2, 8, 3), size),)),
}


def layout(kind: str, rank: int, size: int) -> ShardLayout:
    if kind == "replicated":
        return ShardLayout.replicated((5, 3))
    dim, parts = LAYOUTS[kind](size)
    return ShardLayout(dim=dim, parts=parts, rank=rank, size=size)


def loaded(kind: str, rank: int, size: int, fulls: dict) -> torch.Tensor:
    lay = layout(kind, rank, size)
    param = make_param(lay, dtype=torch.float32)
    param.data.fill_(float("nan"))  # every element must be written or zeroed
    for sid in lay.shard_ids():
        lay.load(param, fulls[sid], sid)
    return param.data


@pytest.mark.parametrize("kind", [*LAYOUTS, "replicated"])
@pytest.mark.parametrize("seed_tp, client_tp", list(itertools.product([1, 2, 4], repeat=2)))
def test_plan_reproduces_the_client_shard(kind, seed_tp, client_tp):
    torch.manual_seed(0)
    shapes = {p.shard_id: p.full_shape for p in layout(kind, 0, 4).parts}
    fulls = {sid: torch.randn(shape) for sid, shape in shapes.items()}
    seeds = [loaded(kind, i, seed_tp, fulls) for i in range(seed_tp)]
    seed_bytes = [t.contiguous().view(torch.uint8).view(-1) for t in seeds]
    for j in range(client_tp):
        want = loaded(kind, j, client_tp, fulls)
        plan = plan_parameter(
            "w",
            layout(kind, j, client_tp),
            [layout(kind, i, seed_tp) for i in range(seed_tp)],
            itemsize=4,
            client_rank=j,
        )
        got = torch.full_like(want, float("nan"))
        flat = got.view(torch.uint8).view(-1)
        for r in plan.reads:
            flat[r.local : r.local + r.nbytes] = seed_bytes[r.seed_rank][
                r.remote : r.remote + r.nbytes
            ]
        for z in plan.zeros:
            got.narrow(z.dim, z.start, z.length).zero_()
        assert torch.equal(got, want), (kind, seed_tp, client_tp, j, plan)
        if seed_tp == client_tp:
            assert len(plan.reads) == 1 and plan.reads[0].seed_rank == j
        assert plan.nbytes <= want.nbytes  # never more than it keeps


def test_reads_are_spread_over_replicas():
    ranks = {
        plan_parameter(
            "w",
            layout("replicated", j, 4),
            [layout("replicated", i, 2) for i in range(2)],
            itemsize=4,
            client_rank=j,
        )
        .reads[0]
        .seed_rank
        for j in range(4)
    }
    assert ranks == {0, 1}


def test_layout_json_round_trip_and_mismatch():
    lay = layout("fused-qkv-replicated-kv", 1, 2)
    assert layout_from_json(layout_to_json(lay)) == lay
    with pytest.raises(LayoutMismatch, match="w: TP dim 1 on the seed, 0 here"):
        plan_parameter(
            "w", layout("column", 0, 1), [layout("row", 0, 1)], itemsize=4, client_rank=0
        )
    with pytest.raises(LayoutMismatch, match="w: parts"):
        plan_parameter(
            "w", layout("column", 0, 1), [layout("fused-qkv", 0, 1)], itemsize=4, client_rank=0
        )
    with pytest.raises(LayoutMismatch, match="malformed layout"):
        layout_from_json({"dim": 0})


class _T:
    def __init__(self, ptr, n):
        self.ptr, self.n = ptr, n

    def data_ptr(self):
        return self.ptr

    def numel(self):
        return self.n

    def element_size(self):
        return 1


def test_registered_regions_merge_adjacent_parameters():
    from workers.remote_instance.registered_memory import regions

    params = {"c": _T(300, 10), "a": _T(100, 50), "b": _T(150, 50), "empty": _T(999, 0)}
    assert regions(params) == [(100, 100), (300, 10)]
    assert regions({"x": _T(100, 50), "view": _T(110, 10)}) == [(100, 50)]  # views of one storage
    # CUDA: adjacent parameters of two allocator segments stay two regions
    segments = [(100, 50), (150, 200)]
    assert regions(params, segments) == [(100, 50), (150, 50), (300, 10)]
