"""The fork's slice plan (pure): for every layout kind and pair of different TP sizes, the pieces
a seed rank sends (`seed_pieces`) placed by the client (`client_targets`, `zero_padding`) give
exactly the client rank's parameter; a client rank receives only what it keeps (half of a
sharded tensor for TP=1 -> 2, whole replicated ones); the seed gathers only when a piece lies on
another seed rank; a missing or mismatched layout falls back to the whole tensor; the digest
and the init request's record."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_remote_instance_reads import LAYOUTS, layout, loaded

from workers.errors import ProtocolError
from workers.layers.sharding import StackedLayout, make_param
from workers.remote_instance.plan import server_of
from workers.remote_instance.reads import LayoutMismatch, layout_from_json, layout_to_json
from workers.remote_instance.slices import (
    LAYOUT_MAX_DEPTH,
    SliceRequest,
    at_rank,
    client_targets,
    layouts_of,
    plan_digest,
    plan_slices,
    seed_pieces,
    span_numel,
    zero_padding,
)

KINDS = [*LAYOUTS, "replicated"]
PAIRS = [(s, c) for s, c in itertools.product([1, 2, 4], repeat=2) if s != c]


def plan_of(kind: str, seed_tp: int, client_tp: int, *, client_kind: str | None = None):
    seed = {"w": layout_to_json(layout(kind, 0, seed_tp))}
    client = {"w": layout_to_json(layout(client_kind or kind, 0, client_tp))}
    return plan_slices(["w"], seed, seed_tp, client, client_tp)[0]


def fulls_of(kind: str) -> dict:
    torch.manual_seed(0)
    shapes = {p.shard_id: p.full_shape for p in layout(kind, 0, 4).parts}
    return {sid: torch.randn(shape) for sid, shape in shapes.items()}


def transfer(ps, seeds: list[torch.Tensor], j: int, client: torch.Tensor) -> int:
    """What the pair group does for client rank j: the seed's pieces, received in order;
    returns the bytes moved."""
    moved = 0
    shards = seeds if ps.gather else None  # without a gather only the serving rank's data
    serving = server_of(j, len(seeds), len(ps.per_rank))
    pieces = seed_pieces(ps.per_rank[j], seeds[serving], shards)
    for piece, (buf, dst) in itertools.zip_longest(pieces, client_targets(ps.per_rank[j], client)):
        assert piece.shape == buf.shape and piece.is_contiguous()
        buf.copy_(piece)
        if dst is not None:
            dst.copy_(buf)
        moved += piece.nbytes
    zero_padding(ps.per_rank[j], client)
    return moved


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed_tp, client_tp", PAIRS)
def test_pieces_rebuild_the_client_shard_and_move_only_it(kind, seed_tp, client_tp):
    fulls = fulls_of(kind)
    seeds = [loaded(kind, i, seed_tp, fulls) for i in range(seed_tp)]
    ps = plan_of(kind, seed_tp, client_tp)
    assert not ps.whole
    for j in range(client_tp):
        want = loaded(kind, j, client_tp, fulls)
        got = torch.full_like(want, float("nan"))
        moved = transfer(ps, seeds, j, got)
        assert torch.equal(got, want), (kind, seed_tp, client_tp, j, ps)
        assert moved <= want.nbytes  # never more than it keeps (padding is not sent)
        assert moved == sum(span_numel(sp, tuple(want.shape)) for sp in ps.per_rank[j].spans) * 4
    if client_tp % seed_tp == 0 or kind == "replicated":
        assert not ps.gather  # every piece on the serving seed rank (checked by `transfer`)


def test_a_tp2_client_of_a_tp1_seed_moves_half_of_each_sharded_tensor():
    for kind in ("column", "row", "fused-qkv"):
        ps = plan_of(kind, 1, 2)
        full = math.prod(layout(kind, 0, 1).local_shape()) * 4
        for j in range(2):
            shape = layout(kind, j, 2).local_shape()
            moved = sum(span_numel(sp, shape) for sp in ps.per_rank[j].spans) * 4
            assert moved == full // 2, kind
        assert not ps.gather  # the TP=1 seed holds everything itself
    ps = plan_of("replicated", 1, 2)
    assert all(p.spans[0].dim is None for p in ps.per_rank)  # replicated: whole, once per rank


def test_the_seed_gathers_only_when_a_piece_lies_on_another_seed_rank():
    assert plan_of("column", 2, 1).gather  # TP=1 client: the other half is on seed rank 1
    assert plan_of("column", 4, 2).gather
    assert not plan_of("column", 2, 4).gather  # clients 0, 1 on seed rank 0; 2, 3 on rank 1
    assert not plan_of("column", 1, 4).gather
    assert not plan_of("replicated", 2, 1).gather
    # KV heads replicated over the seed's ranks: taken from the serving rank, no gather
    assert not plan_of("fused-qkv-replicated-kv", 2, 4).gather


def test_strided_pieces_are_packed_and_dim0_pieces_received_in_place():
    row = plan_of("row", 1, 2)  # dim 1 of a [6, 8] weight: columns 0..3 / 4..7
    client = make_param(layout("row", 0, 2), dtype=torch.float32).data
    [(buf, dst)] = list(client_targets(row.per_rank[0], client))
    assert dst is None and buf.data_ptr() == client.data_ptr()  # [6, 4]: all of it, in place
    seed = torch.arange(48.0).view(6, 8)
    [piece] = list(seed_pieces(row.per_rank[1], seed, None))
    assert piece.is_contiguous() and torch.equal(piece, seed[:, 4:])  # one packed piece
    qkv = plan_of("fused-qkv", 1, 2)  # dim 0: q, k, v rows, each a contiguous range
    client = make_param(layout("fused-qkv", 1, 2), dtype=torch.float32).data
    targets = list(client_targets(qkv.per_rank[1], client))
    assert len(targets) == 3 and all(dst is None for _, dst in targets)
    # a TP=1 client of a TP=2 seed: two column pieces, each strided in its [6, 8] weight
    client = make_param(layout("row", 0, 1), dtype=torch.float32).data
    targets = list(client_targets(plan_of("row", 2, 1).per_rank[0], client))
    assert len(targets) == 2
    for buf, dst in targets:  # received into a contiguous buffer, then copied into place
        assert dst is not None and buf.is_contiguous() and buf.shape == dst.shape == (6, 4)


@pytest.mark.parametrize("seed_tp, client_tp", [(1, 2), (2, 1), (2, 4)])
def test_fused_experts_move_only_their_shard(seed_tp, client_tp):
    inner = {t: layout("3d-dim1", 0, t) for t in (seed_tp, client_tp)}
    stacked = {t: StackedLayout(3, inner[t]) for t in inner}
    torch.manual_seed(0)
    fulls = {(e, None): torch.randn(2, 8, 3) for e in range(3)}

    def load(rank, size):
        lay = at_rank(stacked[size], rank)
        param = make_param(lay, dtype=torch.float32)
        for sid in lay.shard_ids():
            lay.load(param, fulls[sid], sid)
        return param.data

    ps = plan_slices(
        ["e"],
        {"e": layout_to_json(stacked[seed_tp])},
        seed_tp,
        {"e": layout_to_json(stacked[client_tp])},
        client_tp,
    )[0]
    seeds = [load(i, seed_tp) for i in range(seed_tp)]
    for j in range(client_tp):
        want = load(j, client_tp)
        got = torch.full_like(want, float("nan"))
        assert transfer(ps, seeds, j, got) == want.nbytes
        assert torch.equal(got, want)


def test_a_missing_or_mismatched_layout_sends_the_parameter_whole():
    seed = {"a": layout_to_json(layout("column", 0, 2)), "b": layout_to_json(layout("row", 0, 2))}
    client = {"a": layout_to_json(layout("column", 0, 1))}  # nothing reported for "b"
    a, b = plan_slices(["a", "b"], seed, 2, client, 1)
    assert not a.whole and b.whole and b.gather  # b: gathered, sent as checkpoint tensors
    assert plan_of("column", 1, 2, client_kind="row").whole  # other TP dim
    assert plan_of("column", 1, 2, client_kind="fused-qkv").whole  # other parts
    client = {"a": layout_to_json(layout("column", 0, 4)), "b": {"dim": 0}}  # wrong size; malformed
    assert all(p.whole for p in plan_slices(["a", "b"], seed, 2, client, 2))
    with pytest.raises(ProtocolError, match="lack parameter c"):
        plan_slices(["c"], seed, 2, client, 1)


def test_digest_and_request_record():
    a, b = plan_of("column", 1, 2), plan_of("row", 1, 2)
    assert plan_digest([a]) == plan_digest([plan_of("column", 1, 2)])
    assert plan_digest([a]) != plan_digest([b]) != plan_digest([plan_of("column", 1, 4)])

    params = {"w": make_param(layout("row", 1, 2)), "plain": torch.nn.Parameter(torch.ones(2))}
    mine = layouts_of(params.items())
    assert list(mine) == ["w"] and mine["w"]["rank"] == 0  # rank 0's form, whatever the rank
    req = SliceRequest(tp_size=2, layouts=mine, digest=plan_digest([b]))
    assert SliceRequest.from_json(req.to_json()) == req
    for bad, match in [
        ({**req.to_json(), "format": 9}, "format 9"),
        ({**req.to_json(), "tp_size": 0}, "tp_size"),
        ({**req.to_json(), "layouts": []}, "layouts"),
        ({**req.to_json(), "extra": 1}, "unknown fields"),
        ([], "expected an object"),
    ]:
        with pytest.raises(ProtocolError, match=match):
            SliceRequest.from_json(bad)


@pytest.mark.parametrize("depth", [LAYOUT_MAX_DEPTH + 1, 900])
def test_a_layout_nested_past_the_limit_is_refused_naming_the_tensor(depth):
    """A stacked layout stacked again and again (a hostile or buggy client): ProtocolError
    naming the parameter and the limit, no recursion (900 levels recursed past Python's)."""
    raw = layout_to_json(layout("row", 0, 2))
    for _ in range(depth - 2):
        raw = {"stacked": 2, "inner": raw}
    with pytest.raises(ProtocolError) as e:
        SliceRequest.from_json({"format": 1, "tp_size": 2, "layouts": {"w": raw}, "digest": ""})
    assert str(e.value).startswith("slices.layouts['w']['inner']['inner']")
    assert str(e.value).endswith(
        f"nested deeper than {LAYOUT_MAX_DEPTH} levels (a layout's JSON nests "
        f"{LAYOUT_MAX_DEPTH} at most)"
    )
    # the parser accepts no stacked layout inside another either (none is ever written)
    with pytest.raises(LayoutMismatch, match="inner layout is stacked again"):
        layout_from_json(raw)


@pytest.mark.parametrize("sid", [[1], {"a": 1}, 1.5])
def test_a_shard_id_that_is_no_name_or_number_is_a_mismatch(sid):
    raw = layout_to_json(layout("row", 0, 2))
    raw["parts"][0][0] = sid
    with pytest.raises(LayoutMismatch, match="a shard id is a string, an integer or null"):
        layout_from_json(raw)
