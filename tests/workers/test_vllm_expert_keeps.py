"""workers.vllm.keeps for MoE experts (pure: fake layers with the attributes of vLLM's
``RoutedExperts``): what one rank reports it reads of each per-expert checkpoint tensor. A P2P
join into a real vLLM at TP=2 with these keeps runs in tests/engines/test_vllm_moe_tp2.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from workers.vllm import keeps as keeps_mod
from workers.vllm.keeps import expert_kept

LAYER = "model.layers.0.mlp.experts"
INTER, HIDDEN = 8, 4


@pytest.mark.parametrize(
    "shard_id, shape, tp, rank, per_rank, local, want",
    [
        ("w1", (INTER, HIDDEN), 2, 0, 4, True, (0, 0, 4)),  # gate_proj: rows
        ("w1", (INTER, HIDDEN), 2, 1, 4, True, (0, 4, 4)),
        ("w3", (INTER, HIDDEN), 4, 3, 2, True, (0, 6, 2)),  # up_proj: rows
        ("w2", (HIDDEN, INTER), 2, 1, 4, True, (1, 4, 4)),  # down_proj: columns
        ("w2", (HIDDEN, INTER), 1, 0, 8, True, None),  # TP=1: whole
        ("w1", (INTER, HIDDEN), 2, 0, 8, True, None),  # vLLM allocated another size: whole
        ("w1", (9, HIDDEN), 2, 1, 4, True, None),  # 9 rows over 2 ranks: whole
        ("w1", (INTER, HIDDEN), 2, 2, 4, True, None),  # a rank outside the group: whole
        ("w1", (INTER,), 2, 0, 4, True, None),  # a bias: whole
        ("w13", (INTER, HIDDEN), 2, 0, 4, True, None),  # an unknown shard id: whole
        ("w2", (HIDDEN, INTER), 1, 0, 8, False, (0, 0, 0)),  # EP, on another rank: nothing
    ],
)
def test_expert_kept(shard_id, shape, tp, rank, per_rank, local, want):
    kept = expert_kept(shard_id, shape, tp_size=tp, tp_rank=rank, per_rank=per_rank, local=local)
    assert kept == want


@pytest.mark.parametrize("shard_id, dim", [("w1", 0), ("w3", 0), ("w2", 1)])
def test_expert_kept_is_the_ranks_chunk_of_the_intermediate_dim(shard_id, dim):
    """vLLM's TP split of an expert (full // tp from rank * full // tp) is torch.chunk's here."""
    full = torch.arange(INTER * HIDDEN).view(INTER, HIDDEN)
    if dim == 1:
        full = full.t().contiguous()
    for rank in range(2):
        kdim, start, length = expert_kept(
            shard_id, tuple(full.shape), tp_size=2, tp_rank=rank, per_rank=INTER // 2, local=True
        )
        assert kdim == dim
        assert torch.equal(full.narrow(kdim, start, length), full.chunk(2, dim)[rank])


def fake_layer(*, experts=2, tp=2, rank=0, local=None, replicas=None, allocated=None):
    """A RoutedExperts as keeps reads it. ``local``: the global (physical) expert ids this rank
    holds (None: all, no EP); ``replicas``: physical id -> logical id (EPLB's redundant
    experts); ``allocated``: the per-rank size vLLM allocated (default: the unpadded one)."""
    physical = replicas or {e: e for e in range(experts)}
    mapping = [
        ("experts.w13_" if s != "w2" else "experts.w2_", f"experts.{logical}.{p}.", pid, s)
        for pid, logical in physical.items()
        for p, s in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))
    ]
    config = SimpleNamespace(
        intermediate_size_per_partition_unpadded=INTER // tp,
        tp_size=tp,
        tp_rank=rank,
        hidden_dim_unpadded=HIDDEN,
        has_bias=False,
    )
    ids = sorted(local) if local is not None else None
    return SimpleNamespace(
        layer_name=LAYER,
        moe_config=config,
        intermediate_size_per_partition=INTER // tp if allocated is None else allocated,
        get_expert_mapping=lambda: mapping,
        _map_global_expert_id_to_local_expert_id=(
            lambda pid: pid if ids is None else (ids.index(pid) if pid in ids else -1)
        ),
    )


def shapes(experts=2):
    out = {}
    for e in range(experts):
        out[f"{LAYER}.{e}.gate_proj.weight"] = (INTER, HIDDEN)
        out[f"{LAYER}.{e}.up_proj.weight"] = (INTER, HIDDEN)
        out[f"{LAYER}.{e}.down_proj.weight"] = (HIDDEN, INTER)
    out["model.layers.0.mlp.gate.weight"] = (experts, HIDDEN)
    return out


@pytest.fixture
def plain(monkeypatch):
    """Every fake layer counts as unquantized experts loaded by their own loader."""
    monkeypatch.setattr(keeps_mod, "_plain_experts", lambda layer: True)


def test_a_tp_rank_keeps_its_half_of_every_expert(plain):
    got = keeps_mod._layer_expert_keeps(fake_layer(rank=1), shapes())
    assert got == {
        f"{LAYER}.{e}.{p}.weight": kept
        for e in range(2)
        for p, kept in (("gate_proj", (0, 4, 4)), ("up_proj", (0, 4, 4)), ("down_proj", (1, 4, 4)))
    }  # the router is not an expert: read whole


def test_expert_parallelism_keeps_nothing_of_experts_on_other_ranks(plain):
    got = keeps_mod._layer_expert_keeps(fake_layer(experts=4, tp=1, local={2, 3}), shapes(4))
    # experts 2, 3 are this rank's (read whole: not listed); 0, 1 no loader reads
    assert got == {
        f"{LAYER}.{e}.{p}.weight": (0, 0, 0)
        for e in (0, 1)
        for p in ("gate_proj", "up_proj", "down_proj")
    }


def test_a_redundant_copy_on_this_rank_keeps_its_logical_expert(plain):
    """EPLB: physical expert 2 is a copy of logical expert 0; this rank holds only it."""
    layer = fake_layer(tp=1, local={2}, replicas={0: 0, 1: 1, 2: 0})
    got = keeps_mod._layer_expert_keeps(layer, shapes())
    assert got == {
        f"{LAYER}.1.{p}.weight": (0, 0, 0) for p in ("gate_proj", "up_proj", "down_proj")
    }


def test_anything_unknown_is_read_whole(plain):
    edited = shapes()
    edited[f"{LAYER}.0.up_proj.weight"] = (INTER, HIDDEN + 1)  # not the model's shape
    del edited[f"{LAYER}.1.down_proj.weight"]  # not in the update
    got = keeps_mod._layer_expert_keeps(fake_layer(), edited)
    assert f"{LAYER}.0.up_proj.weight" not in got and f"{LAYER}.1.down_proj.weight" not in got
    assert got[f"{LAYER}.0.gate_proj.weight"] == (0, 0, 4)
    # vLLM allocated a padded per-rank size: the layer reports nothing
    assert keeps_mod._layer_expert_keeps(fake_layer(allocated=INTER // 2 + 2), shapes()) == {}


def test_experts_that_do_not_load_as_declared_report_nothing(monkeypatch):
    monkeypatch.setattr(keeps_mod, "_plain_experts", lambda layer: False)
    assert keeps_mod._layer_expert_keeps(fake_layer(), shapes()) == {}
