"""Qwen3-MoE in one process against `transformers`: logits (prefill and decode, with and without
`norm_topk_prob`, dense layers mixed in), the expert mapping both ways, every checkpoint tensor
accounted for, the fused experts split over TP ranks built side by side, config errors."""

from __future__ import annotations

import pytest
import torch
from workers_testutil import checkpoint_state, make_hf_model

from workers.distributed import TensorParallel
from workers.errors import ConfigError, WeightCheckError
from workers.layers.moe import EXPERT_WEIGHTS, FusedExperts, expert_params_mapping
from workers.models import ModelConfig, MoeDecoderForCausalLM, build_model

VARIANTS = {
    "plain": {},
    "norm-topk": dict(norm_topk_prob=True, num_experts_per_tok=3),
    "dense-layer-tied": dict(mlp_only_layers=[0], tie_word_embeddings=True),
    "sparse-step": dict(decoder_sparse_step=2, num_hidden_layers=3),
}


def ours_from(hf_model, state=None, tp=None):
    raw = {**hf_model.config.to_dict(), "architectures": [type(hf_model).__name__]}
    config = ModelConfig.from_dict(raw)
    tp = tp or TensorParallel()
    model = build_model(config, tp=tp, dtype=torch.float32, device=torch.device("cpu"))
    state = checkpoint_state(hf_model) if state is None else state
    assert model.load_weights(state.items()) == set(model.checkpoint_names())
    return model


@pytest.fixture(scope="module")
def moe():
    hf = make_hf_model("qwen3_moe")
    state = checkpoint_state(hf)
    return hf, state, ours_from(hf, state)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_prefill_and_decode(variant):
    hf = make_hf_model("qwen3_moe", seed=3, **VARIANTS[variant])
    model = ours_from(hf)
    assert isinstance(model, MoeDecoderForCausalLM)
    ids = torch.randint(0, hf.config.vocab_size, (11,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
        cache = model.new_cache(11)
        got = torch.cat([model(ids[:7], cache, 0), model(ids[7:8], cache, 7)])
        got = torch.cat([got, model(ids[8:], cache, 8)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_every_checkpoint_tensor_is_accounted_for_and_served_in_checkpoint_layout(moe):
    _, state, model = moe
    assert sum(".experts." in n for n in state) == 2 * 8 * 3  # layers x experts x projections
    assert set(model.checkpoint_names()) == set(state)
    got = dict(model.checkpoint_tensors())
    assert set(got) == set(state)
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert model.check_weights((n, t.dtype, t.shape) for n, t in state.items()) == []


@pytest.mark.parametrize(
    "name, param, shard",
    [
        ("model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.experts.gate_up_proj", (0, 0)),
        ("model.layers.1.mlp.experts.7.up_proj.weight", "model.layers.1.mlp.experts.gate_up_proj", (7, 1)),
        ("model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.1.mlp.experts.down_proj", (3, None)),
        ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.gate.weight", None),
        ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.qkv_proj.weight", "k"),
    ],
)  # fmt: skip
def test_expert_mapping_both_ways(moe, name, param, shard):
    model = moe[2]
    assert model.resolve(name) == (param, shard)
    assert model.checkpoint_name(param, shard) == name


def test_mapping_is_one_declared_table():
    mapping = expert_params_mapping(2)
    assert len(mapping) == 2 * len(EXPERT_WEIGHTS)
    assert mapping["experts.1.up_proj.weight"] == ("experts.gate_up_proj", (1, 1))
    assert mapping["experts.0.down_proj.weight"] == ("experts.down_proj", (0, None))


@pytest.mark.parametrize(
    "weights, message",
    [
        ([("model.layers.0.mlp.experts.8.gate_proj.weight", torch.zeros(32, 64))], "no such"),
        ([("model.layers.0.mlp.experts.2.down_proj.weight", torch.zeros(32, 64))], r"shape \(32, 64\)"),
        ([("model.layers.0.mlp.experts.2.gate.weight", torch.zeros(32, 64))], "no such"),
        ([("model.layers.0.mlp.gate.weight", torch.zeros(9, 64))], r"shape \(9, 64\)"),
    ],
    ids=["expert-out-of-range", "down-transposed", "unknown-projection", "router-shape"],
)  # fmt: skip
def test_load_weights_refuses_and_writes_nothing(weights, message):
    model = ours_from(make_hf_model("qwen3_moe"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = ("model.layers.1.mlp.experts.0.up_proj.weight", torch.zeros(32, 64))
    with pytest.raises(WeightCheckError, match=message):
        model.load_weights([good, *weights])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_one_expert_in_place(moe):
    _, state, _ = moe
    model = ours_from(make_hf_model("qwen3_moe"), state)
    param = model.model.layers[1].mlp.experts.gate_up_proj
    ptr, new = param.data_ptr(), torch.randn(32, 64)
    model.load_weights([("model.layers.1.mlp.experts.5.up_proj.weight", new)])
    assert param.data_ptr() == ptr
    assert torch.equal(param.data[5, 32:], new)
    assert torch.equal(param.data[5, :32], state["model.layers.1.mlp.experts.5.gate_proj.weight"])


class _NoReduce(TensorParallel):
    """Rank r of a group built side by side in one process: the test sums the partial outputs."""

    def all_reduce(self, x):
        return x


@pytest.mark.parametrize("size", [2, 4])
def test_fused_experts_split_over_tp_sum_to_the_whole(size):
    experts, hidden, inter = 4, 6, 8
    full = {
        n: torch.randn(*((hidden, inter) if n.endswith("down_proj") else (inter, hidden)))
        for e in range(experts)
        for n in [f"{e}.{p}" for p in EXPERT_WEIGHTS]
    }
    whole = FusedExperts(hidden, inter, experts, tp=TensorParallel())
    parts = [FusedExperts(hidden, inter, experts, tp=_NoReduce(r, size)) for r in range(size)]
    for layer in (whole, *parts):
        for key, tensor in full.items():
            e, proj = key.split(".")
            fused, sid = EXPERT_WEIGHTS[proj]
            param = getattr(layer, fused)
            param.weight_loader(param, tensor, (int(e), sid))
    for fused in ("gate_up_proj", "down_proj"):
        params = [getattr(p, fused) for p in parts]
        back = params[0].shard_layout.unshard([p.data for p in params])
        assert set(back) == set(getattr(whole, fused).shard_layout.shard_ids())
        for (e, sid), tensor in back.items():
            proj = next(p for p, (f, s) in EXPERT_WEIGHTS.items() if f == fused and s == sid)
            assert torch.equal(tensor, full[f"{e}.{proj}"])
    x = torch.randn(5, hidden)
    weights = torch.rand(5, 2)
    ids = torch.tensor([[0, 1], [1, 3], [3, 0], [2, 1], [0, 2]])
    torch.testing.assert_close(sum(p(x, weights, ids) for p in parts), whole(x, weights, ids))


MOE_BASE = dict(
    architectures=["Qwen3MoeForCausalLM"],
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=8,
)


def test_config_parsing_and_sparse_layers():
    config = ModelConfig.from_dict({**MOE_BASE, "mlp_only_layers": [1], "norm_topk_prob": True})
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (
        4,
        2,
        8,
    )
    assert config.qk_norm and config.norm_topk_prob and config.mlp_only_layers == (1,)
    assert [config.is_moe_layer(i) for i in range(2)] == [True, False]
    raw = {k: v for k, v in MOE_BASE.items() if k != "num_experts"}
    assert ModelConfig.from_dict({**raw, "num_local_experts": 6}).num_experts == 6
    dense = ModelConfig.from_dict({**MOE_BASE, "architectures": ["Qwen3ForCausalLM"]})
    assert dense.num_experts == 0 and not dense.is_moe_layer(0)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({**MOE_BASE, "num_experts_per_tok": 5}, "num_experts_per_tok 5 must be in 1..num_experts"),
        ({**MOE_BASE, "num_experts": 0}, "needs num_experts > 0"),
        ({k: v for k, v in MOE_BASE.items() if k != "moe_intermediate_size"}, "moe_intermediate_size"),
    ],
)  # fmt: skip
def test_config_errors_name_the_problem(raw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw)


def test_moe_intermediate_must_divide_by_tp():
    config = ModelConfig.from_dict(
        {**MOE_BASE, "moe_intermediate_size": 7, "num_key_value_heads": 4}
    )
    with pytest.raises(ConfigError, match="moe_intermediate_size 7 does not divide"):
        build_model(config, tp=_NoReduce(0, 2), dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("seed_tp, client_tp", [(1, 2), (2, 1), (2, 4), (4, 2), (2, 2)])
def test_one_sided_read_plan_rebuilds_every_experts_shard(seed_tp, client_tp):
    """`remote_instance.reads` (the transfer-engine fork) on fused experts: executing the plan
    on the seed ranks' bytes gives the client rank's parameters; equal TP: one range each."""
    from workers.remote_instance.reads import layout_from_json, layout_to_json, plan_parameter

    experts, hidden, inter = 3, 4, 8
    torch.manual_seed(0)
    full = {(e, p): torch.randn(4, 8) if p == "down_proj" else torch.randn(8, 4)
            for e in range(experts) for p in EXPERT_WEIGHTS}  # fmt: skip

    def build(rank, size):
        layer = FusedExperts(hidden, inter, experts, tp=_NoReduce(rank, size))
        for (e, proj), tensor in full.items():
            fused, sid = EXPERT_WEIGHTS[proj]
            param = getattr(layer, fused)
            param.weight_loader(param, tensor, (e, sid))
        return layer

    seeds = [build(i, seed_tp) for i in range(seed_tp)]
    for j in range(client_tp):
        client = build(j, client_tp)
        for fused in ("gate_up_proj", "down_proj"):
            want = getattr(client, fused)
            layouts = [
                layout_from_json(layout_to_json(getattr(s, fused).shard_layout)) for s in seeds
            ]
            plan = plan_parameter(fused, want.shard_layout, layouts, itemsize=4, client_rank=j)
            got = torch.full_like(want.data, float("nan"))
            flat = got.view(torch.uint8).view(-1)
            for r in plan.reads:
                src = getattr(seeds[r.seed_rank], fused).data.view(torch.uint8).view(-1)
                flat[r.local : r.local + r.nbytes] = src[r.remote : r.remote + r.nbytes]
            assert torch.equal(got, want.data), (fused, j)
            if seed_tp == client_tp:
                assert len(plan.reads) == 1
