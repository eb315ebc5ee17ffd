"""The dense decoder in one process (TP=1) against `transformers`, its config parsing, and its
checkpoint-name contract: load_weights / check_weights / checkpoint_tensors."""

from __future__ import annotations

import pytest
import torch
from workers_testutil import make_hf_model

from workers.distributed import TensorParallel
from workers.errors import ConfigError, WeightCheckError
from workers.models import ModelConfig, build_model, resolve_dtype

LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)
VARIANTS = {
    "qwen3": ("qwen3", {}),
    "qwen3-tied-bias-mha": (
        "qwen3",
        dict(tie_word_embeddings=True, attention_bias=True, num_key_value_heads=4),
    ),
    "qwen3-theta": ("qwen3", dict(rope_theta=1e6, num_key_value_heads=1)),
    "llama": ("llama", {}),
    "llama-llama3-rope-bias": (
        "llama",
        dict(
            rope_scaling=LLAMA3_ROPE, attention_bias=True, mlp_bias=True, tie_word_embeddings=True
        ),
    ),
    "llama-linear-rope": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "llama-dynamic-rope": ("llama", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0))),
}


def ours_from(hf_model, dtype=torch.float32):
    raw = {**hf_model.config.to_dict(), "architectures": [type(hf_model).__name__]}
    config = ModelConfig.from_dict(raw)
    model = build_model(config, tp=TensorParallel(), dtype=dtype, device=torch.device("cpu"))
    loaded = model.load_weights(hf_model.state_dict().items())
    assert loaded == set(model.checkpoint_names())
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_prefill_and_decode(variant):
    family, overrides = VARIANTS[variant]
    hf = make_hf_model(family, **overrides)
    model = ours_from(hf)
    ids = torch.randint(0, hf.config.vocab_size, (11,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
        cache = model.new_cache(11)
        got = torch.cat([model(ids[:6], cache, 0), model(ids[6:9], cache, 6)])
        got = torch.cat([got, model(ids[9:10], cache, 9), model(ids[10:], cache, 10)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_bfloat16_model_is_close_to_transformers():
    hf = make_hf_model("qwen3")
    model = ours_from(hf, dtype=torch.bfloat16)
    ids = torch.arange(1, 9)
    with torch.no_grad():
        want = hf.to(torch.bfloat16)(ids[None]).logits[0].float()
        got = model(ids, model.new_cache(8), 0).float()
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)


def test_checkpoint_tensors_are_the_state_dict():
    hf = make_hf_model("llama", tie_word_embeddings=True)
    model = ours_from(hf)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    got = dict(model.checkpoint_tensors())
    assert set(got) == set(state) == set(model.checkpoint_names())
    assert all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "name, param, shard",
    [
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.qkv_proj.weight", "q"),
        ("model.layers.1.self_attn.k_proj.bias", "model.layers.1.self_attn.qkv_proj.bias", "k"),
        ("model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.qkv_proj.weight", "v"),
        ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.gate_up_proj.weight", 0),
        ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.gate_up_proj.weight", 1),
        ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.o_proj.weight", None),
        ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.q_norm.weight", None),
        ("model.embed_tokens.weight", "model.embed_tokens.weight", None),
        ("lm_head.weight", "lm_head.weight", None),
    ],
)
def test_name_mapping_both_ways(name, param, shard):
    model = ours_from(make_hf_model("qwen3", attention_bias=True))
    assert model.resolve(name) == (param, shard)
    assert model.checkpoint_name(param, shard) == name


def test_load_weights_any_order_any_subset_in_place():
    hf = make_hf_model("qwen3")
    model = ours_from(hf)
    qkv = model.model.layers[1].self_attn.qkv_proj.weight
    storage = qkv.data_ptr()
    new_k = torch.randn(32, 64)
    assert model.load_weights([("model.layers.1.self_attn.k_proj.weight", new_k)]) == {
        "model.layers.1.self_attn.k_proj.weight"
    }
    assert qkv.data_ptr() == storage
    assert torch.equal(qkv.data[64:96], new_k)
    assert torch.equal(qkv.data[:64], hf.state_dict()["model.layers.1.self_attn.q_proj.weight"])


@pytest.mark.parametrize(
    "weights, message",
    [
        (
            [("model.layers.9.mlp.up_proj.weight", torch.zeros(128, 64))],
            "model.layers.9.mlp.up_proj",
        ),
        ([("model.bogus.weight", torch.zeros(1))], "model.bogus.weight: the model has no such"),
        ([("model.norm.weight", torch.zeros(65))], r"model.norm.weight: shape \(65,\)"),
        (
            [("model.norm.weight", torch.zeros(64)), ("model.norm.weight", torch.zeros(64))],
            "given twice",
        ),
        ([("model.norm.weight", torch.zeros(64, dtype=torch.int32))], "not a floating-point"),
    ],
    ids=["layer-out-of-range", "unknown", "shape", "duplicate", "dtype"],
)
def test_load_weights_refuses_and_writes_nothing(weights, message):
    model = ours_from(make_hf_model("qwen3"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = ("model.layers.0.input_layernorm.weight", torch.zeros(64))
    with pytest.raises(WeightCheckError, match=message):
        model.load_weights([good, *weights])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_check_weights_reports_without_writing():
    model = ours_from(make_hf_model("qwen3"))
    problems = model.check_weights(
        [
            ("model.norm.weight", "float32", [64]),
            ("model.layers.0.self_attn.q_proj.weight", "bfloat16", (64, 64)),
            ("nope", torch.float16, (1,)),
            ("model.norm.weight", "int8", [64]),
        ]
    )
    assert problems == [
        "nope: the model has no such tensor",
        "model.norm.weight: given twice",
        "model.norm.weight: dtype int8 is not a floating-point dtype",
    ]


def test_update_checks_refuse_a_floating_dtype_other_than_the_models():
    model = ours_from(make_hf_model("qwen3"), dtype=torch.bfloat16)
    metas = [
        ("model.norm.weight", "float32", [64]),
        ("model.layers.0.self_attn.q_proj.weight", "bfloat16", (64, 64)),
    ]
    assert model.check_weights(metas) == []  # a disk load converts (--dtype)
    assert model.check_weights(metas, exact_dtype=True) == [
        "model.norm.weight: dtype float32 is not the model's bfloat16 (an update is not converted)"
    ]


def test_tied_checkpoint_may_carry_lm_head_and_rotary_tables():
    model = ours_from(make_hf_model("llama", tie_word_embeddings=True))
    extra = [
        ("lm_head.weight", torch.zeros(256, 64)),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(8)),
    ]
    assert model.load_weights(extra) == set()
    assert model.model.embed_tokens.weight.abs().sum() > 0


# ---- config.json parsing ------------------------------------------------------------------

BASE = dict(
    architectures=["LlamaForCausalLM"],
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
)


@pytest.mark.parametrize(
    "raw, expect",
    [
        (BASE, dict(num_kv_heads=4, head_dim=4, rope_type="default", theta=10000.0)),
        (
            {**BASE, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}},
            dict(rope_type="linear", theta=5e5, factor=2.0),
        ),
        (
            {**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, **LLAMA3_ROPE}},
            dict(rope_type="llama3", original_max_position=64),
        ),
        ({**BASE, "torch_dtype": "bfloat16"}, dict(dtype="bfloat16")),
        ({**BASE, "architectures": ["Qwen3ForCausalLM"]}, dict(qk_norm=True)),
        ({**BASE, "num_key_value_heads": 2, "head_dim": 8}, dict(num_kv_heads=2, head_dim=8)),
    ],
)
def test_config_parsing(raw, expect):
    config = ModelConfig.from_dict(raw)
    for key, value in expect.items():
        obj = config.rope if hasattr(config.rope, key) and not hasattr(config, key) else config
        assert getattr(obj, key) == value, key


@pytest.mark.parametrize(
    "raw, message",
    [
        ({**BASE, "architectures": ["GPT2LMHeadModel"]}, "LlamaForCausalLM, Qwen3ForCausalLM"),
        ({**BASE, "hidden_act": "gelu"}, "silu"),
        ({**BASE, "use_sliding_window": True}, "sliding"),
        ({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn.*supported"),
        ({k: v for k, v in BASE.items() if k != "vocab_size"}, "vocab_size"),
        ({**BASE, "num_key_value_heads": 3}, "do not group"),
        ({**BASE, "dtype": "int8"}, "dtype"),
    ],
)
def test_config_errors_name_the_problem(raw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw)


def test_resolve_dtype():
    config = ModelConfig.from_dict({**BASE, "dtype": "bfloat16"})
    assert resolve_dtype("auto", config) is torch.bfloat16
    assert resolve_dtype("float32", config) is torch.float32
    assert resolve_dtype("auto", ModelConfig.from_dict(BASE)) is torch.float32
