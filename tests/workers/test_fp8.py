"""Block-FP8 in one process: the format (dequantization, config), scales sharded with the weights
over TP ranks built side by side, and the model's post-load hook: exact against transformers with
the dequantized weights, re-entrant over updates in any bucket order, memory flat.

Tolerance against the bf16 original (the same random model before quantization), float32 logits
over 32 teacher-forced positions, measured on CPU over 3 seeds x {qwen3, llama}, compute in
float32 and bf16: RMS error / RMS logit 0.10-0.16 and max error / max |logit| 0.11-0.22; top-1
agreement 0.69-0.94. The FP8 format itself is exact: against transformers running the
dequantized weights the float32 logits agree within 4e-6. The random test model amplifies the
~2.6% RMS weight error of e4m3 (3 mantissa bits); the bounds below keep a margin over these.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from fp8_testutil import BLOCK, bf16_model, fp8_state_dict, quantize_block_fp8

from workers.distributed import TensorParallel
from workers.errors import ConfigError, WeightCheckError
from workers.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from workers.layers import fp8 as fp8_mod
from workers.layers.fp8 import Fp8Config, dequantize_block_fp8
from workers.model_loader import get_load_format
from workers.models import ModelConfig, build_model

FP8_CONFIG = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
RMS_REL_TOL, MAX_REL_TOL, MIN_AGREEMENT = 0.2, 0.3, 0.6
LLAMA = dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)


def naive_dequant(w: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    rows, cols = w.shape
    i = torch.arange(rows)[:, None] // block[0]
    j = torch.arange(cols)[None, :] // block[1]
    return w.float() * s.float()[i, j]


# ---- the format -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(256, 128), (300, 200), (64, 96), (129, 1)])
@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
@pytest.mark.parametrize("slab", [1, 1 << 24])  # 1: one block row per slab
def test_dequantize_is_the_blockwise_product(shape, block, slab, monkeypatch):
    monkeypatch.setattr(fp8_mod, "_SLAB_ELEMENTS", slab)
    w = torch.randn(shape) * 3
    q, s = quantize_block_fp8(w, block)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (
        -(-shape[0] // block[0]),
        -(-shape[1] // block[1]),
    )
    got = dequantize_block_fp8(q, s, block)
    assert torch.equal(got, naive_dequant(q, s, block))
    # e4m3 keeps 3 mantissa bits: each element within 1/16 of its block's max magnitude
    assert (got - w).abs().max() <= w.abs().max() / 16
    out = torch.empty(shape, dtype=torch.bfloat16)
    dequantize_block_fp8(q, s, block, out=out)
    assert torch.equal(out, naive_dequant(q, s, block).to(torch.bfloat16))


def test_dequantize_rejects_a_scale_of_another_shape():
    q, s = quantize_block_fp8(torch.randn(256, 256))
    with pytest.raises(ValueError, match="scale shape"):
        dequantize_block_fp8(q, s[:1], BLOCK)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (None, None),
        (FP8_CONFIG, Fp8Config()),
        (
            {**FP8_CONFIG, "fmt": "e4m3", "weight_block_size": [64, 32]},
            Fp8Config(weight_block_size=(64, 32)),
        ),
        (
            {
                **FP8_CONFIG,
                "modules_to_not_convert": ["lm_head"],
                "ignored_layers": ["mlp.down_proj"],
            },
            Fp8Config(modules_to_not_convert=("lm_head", "mlp.down_proj")),
        ),
    ],
)
def test_fp8_config_parses(raw, expected):
    assert Fp8Config.from_hf(raw) == expected


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"quant_method": "awq"}, "supported: 'fp8'"),
        ({"quant_method": "fp8"}, "per-tensor FP8"),
        ({**FP8_CONFIG, "activation_scheme": "static"}, "activation_scheme"),
        ({**FP8_CONFIG, "fmt": "e5m2"}, "fmt"),
        ({**FP8_CONFIG, "weight_block_size": [128]}, "two positive"),
        ({**FP8_CONFIG, "weight_block_size": [0, 128]}, "two positive"),
        ({**FP8_CONFIG, "weight_block_size": ["x", 1]}, "quantization_config"),
        ("fp8", "must be an object"),
    ],
)
def test_fp8_config_refuses_what_it_cannot_serve(raw, match):
    with pytest.raises(ConfigError, match=match):
        Fp8Config.from_hf(raw)


def test_modules_to_not_convert_applies_per_layer_and_refuses_a_split_fused_layer():
    cfg = Fp8Config(
        modules_to_not_convert=("down_proj", "model.layers.1", "layers.0.mlp.gate_proj")
    )
    assert cfg.for_modules(["model.layers.0.mlp.down_proj"]) is None
    assert (
        cfg.for_modules(["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"])
        is None
    )
    assert cfg.for_modules(["model.layers.0.self_attn.o_proj"]) is cfg
    with pytest.raises(ConfigError, match="fused"):
        cfg.for_modules(["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"])


# ---- layers: scales sharded with the weights ------------------------------------------------


def ranks(size: int) -> list[TensorParallel]:
    return [TensorParallel(rank=r, size=size) for r in range(size)]


def build_layers(kind: str, size: int):
    """(layers of every rank, {shard id: full float weight}, dim)."""
    cfg, g = Fp8Config(), torch.Generator().manual_seed(size)
    q = dict(quant=cfg, prefix=f"test.{kind}")
    if kind == "column":
        layers = [ColumnParallelLinear(256, 512, bias=False, tp=tp, **q) for tp in ranks(size)]
        return layers, {None: torch.randn(512, 256, generator=g)}, 0
    if kind == "merged":
        layers = [
            MergedColumnParallelLinear(128, [256, 512], bias=False, tp=tp, **q)
            for tp in ranks(size)
        ]
        return (
            layers,
            {0: torch.randn(256, 128, generator=g), 1: torch.randn(512, 128, generator=g)},
            0,
        )
    if kind == "qkv-replicated-kv":  # 1 KV head of 128: replicated on every rank
        layers = [QKVParallelLinear(256, 128, 2, 1, bias=False, tp=tp, **q) for tp in ranks(size)]
        full = {s: torch.randn(256 if s == "q" else 128, 256, generator=g) for s in "qkv"}
        return layers, full, 0
    layers = [RowParallelLinear(512, 384, bias=False, tp=tp, **q) for tp in ranks(size)]
    return layers, {None: torch.randn(384, 512, generator=g)}, 1


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("kind", ["column", "merged", "qkv-replicated-kv", "row"])
def test_scales_shard_with_the_weights(kind, size):
    layers, full, dim = build_layers(kind, size)
    quantized = {sid: quantize_block_fp8(w) for sid, w in full.items()}
    items = [(sid, which) for sid in quantized for which in (0, 1)]
    random.Random(size).shuffle(items)  # weights and scales in any order
    for layer in layers:
        for sid, which in items:
            param = layer.weight_scale_inv if which else layer.weight
            param.weight_loader(param, quantized[sid][which], sid)
        layer.process_weights_after_loading()
    # The parameters keep the checkpoint layout: unsharding gives back the file's tensors.
    for which, attr in ((0, "weight"), (1, "weight_scale_inv")):
        params = [getattr(layer, attr) for layer in layers]
        back = params[0].shard_layout.unshard(
            [p.data.view(torch.uint8) if which == 0 else p.data for p in params]
        )
        for sid, (q, s) in quantized.items():
            want = q.view(torch.uint8) if which == 0 else s
            assert torch.equal(back[sid], want)
    # Every rank's forward weight is its slice of the full dequantized weight, bit for bit.
    dense = {sid: naive_dequant(q, s, BLOCK) for sid, (q, s) in quantized.items()}
    layout = layers[0].weight.shard_layout
    for layer in layers:
        expected = torch.empty_like(layer.weight_dequant)
        for sid, w in dense.items():
            layer.weight.shard_layout.load(expected, w, sid)
        assert torch.equal(layer.weight_dequant, expected)
    x = torch.randn(3, layout.parts[0].full_shape[1])
    if dim == 1:
        partial = sum(
            F.linear(c, layer.weight_dequant) for c, layer in zip(x.chunk(size, -1), layers)
        )
        torch.testing.assert_close(partial, F.linear(x, dense[None]), atol=1e-4, rtol=1e-4)
    elif kind == "column":
        out = torch.cat([layer(x) for layer in layers], dim=-1)
        torch.testing.assert_close(out, F.linear(x, dense[None]))


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda tp: ColumnParallelLinear(
                256, 256, bias=False, tp=tp, quant=Fp8Config(), prefix="m.a"
            ),
            r"m\.a: 256 output rows",
        ),
        (
            lambda tp: RowParallelLinear(
                256, 256, bias=False, tp=tp, quant=Fp8Config(), prefix="m.b"
            ),
            r"m\.b: 256 input columns",
        ),
        (
            lambda tp: QKVParallelLinear(
                256, 64, 4, 4, bias=False, tp=tp, quant=Fp8Config(), prefix="m.qkv"
            ),
            r"m\.qkv \(shard 'q'\)",
        ),
    ],
)
def test_tp_shards_off_the_scale_blocks_are_refused_naming_the_layer(make, match):
    with pytest.raises(ConfigError, match=match):
        make(TensorParallel(rank=0, size=4))


# ---- the model: exactness, tolerance, re-entrant post hook ------------------------------------


def fp8_model_config(hf, **quant) -> ModelConfig:
    raw = {**hf.config.to_dict(), "architectures": [type(hf).__name__]}
    raw["quantization_config"] = {**FP8_CONFIG, **quant}
    return ModelConfig.from_dict(raw)


def fp8_model(hf, dtype=torch.float32, **quant):
    config = fp8_model_config(hf, **quant)
    return build_model(config, tp=TensorParallel(), dtype=dtype, device=torch.device("cpu"))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, model.new_cache(len(ids)), 0).float()


IDS = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def pair():
    """Two bf16 originals of the same shape (the checkpoints updates alternate between)."""
    return bf16_model("qwen3", seed=0), bf16_model("qwen3", seed=1)


@pytest.mark.parametrize(
    "family, overrides", [("qwen3", {}), ("llama", LLAMA)], ids=["qwen3", "llama"]
)
def test_fp8_model_is_exactly_transformers_on_the_dequantized_weights(family, overrides):
    hf = bf16_model(family, **overrides, intermediate_size=320)  # 320: a partial last block
    state = fp8_state_dict(hf)
    model = fp8_model(hf)
    assert model.load_weights(state.items()) == set(model.checkpoint_names()) == set(state)
    model.process_weights_after_loading()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name + "_scale_inv" in state:
                p.copy_(naive_dequant(state[name], state[name + "_scale_inv"], BLOCK))
        want = hf(IDS[None]).logits[0]
    torch.testing.assert_close(logits(model, IDS), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize(
    "family, overrides", [("qwen3", {}), ("llama", LLAMA)], ids=["qwen3", "llama"]
)
def test_fp8_model_stays_close_to_the_bf16_original(family, overrides, dtype):
    hf = bf16_model(family, **overrides)
    model = fp8_model(hf, dtype)
    model.load_weights(fp8_state_dict(hf).items())
    model.process_weights_after_loading()
    with torch.no_grad():
        want = hf(IDS[None]).logits[0]
    got = logits(model, IDS)
    err = got - want
    assert err.pow(2).mean().sqrt() <= RMS_REL_TOL * want.pow(2).mean().sqrt()
    assert err.abs().max() <= MAX_REL_TOL * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= MIN_AGREEMENT


def test_checkpoint_tensors_are_the_fp8_files_and_bf16_scales_widen_exactly(pair):
    hf = pair[0]
    model = fp8_model(hf, torch.bfloat16)
    state = fp8_state_dict(hf, scale_dtype=torch.bfloat16)  # as some Qwen3-FP8 checkpoints
    model.load_weights(state.items())
    served = dict(model.checkpoint_tensors())
    assert set(served) == set(state)
    for name, t in state.items():
        if name.endswith("_scale_inv"):
            assert served[name].dtype == torch.float32 and torch.equal(served[name], t.float())
        else:
            assert served[name].dtype == t.dtype
            assert torch.equal(served[name].view(torch.uint8), t.view(torch.uint8))


def test_a_tensor_of_the_wrong_dtype_is_refused_before_any_write(pair):
    model = fp8_model(pair[0])
    state = fp8_state_dict(pair[0])
    name = "model.layers.0.mlp.down_proj.weight"
    problems = model.check_weights([(name, "bfloat16", tuple(state[name].shape))])
    assert problems == [f"{name}: dtype bfloat16 is not float8_e4m3fn"]
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(WeightCheckError, match="float8_e4m3fn"):
        model.load_weights([(name, state[name].to(torch.bfloat16))])
    assert torch.equal(
        model.model.layers[0].mlp.down_proj.weight.view(torch.uint8), before.view(torch.uint8)
    )
    assert (
        model.check_weights(
            [(name + "_scale_inv", "bfloat16", tuple(state[name + "_scale_inv"].shape))]
        )
        == []
    )


def in_buckets(state: dict, seed: int, bucket: int = 5):
    """The checkpoint in shuffled buckets: a weight and its scale usually land apart."""
    items = list(state.items())
    random.Random(seed).shuffle(items)
    return [items[i : i + bucket] for i in range(0, len(items), bucket)]


def storage(model) -> dict[str, tuple[int, torch.dtype, tuple[int, ...]]]:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {n: (t.data_ptr(), t.dtype, tuple(t.shape)) for n, t in tensors.items()}


def snapshot(model) -> dict[str, torch.Tensor]:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {n: t.detach().clone() for n, t in tensors.items()}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8))
        if a[n].dtype.itemsize == 1
        else torch.equal(a[n], b[n])
        for n in a
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_updates_after_a_dummy_load_are_a_fresh_load_bit_for_bit(pair, tmp_path, dtype):
    """dummy -> A -> B -> A, each update in shuffled buckets with one post hook at the end:
    every parameter and buffer, and the logits, equal those of a fresh load; nothing is
    re-allocated; running the hook again changes nothing."""
    states = [fp8_state_dict(hf) for hf in pair]
    fresh = []
    for state in states:
        model = fp8_model(pair[0], dtype)
        model.load_weights(state.items())
        model.process_weights_after_loading()
        fresh.append((snapshot(model), logits(model, IDS)))

    model = fp8_model(pair[0], dtype)
    get_load_format("dummy").load(model, tmp_path)
    layout = storage(model)
    for step, which in enumerate([0, 1, 0]):
        for bucket in in_buckets(states[which], seed=step):
            model.load_weights(bucket)
        model.process_weights_after_loading()
        assert storage(model) == layout
        assert same_bits(snapshot(model), fresh[which][0])
        assert torch.equal(logits(model, IDS), fresh[which][1])
    model.process_weights_after_loading()  # idempotent
    assert same_bits(snapshot(model), fresh[0][0])


def test_dummy_load_fills_fp8_parameters_and_their_forward_weights(pair, tmp_path):
    model = fp8_model(pair[0], torch.bfloat16)
    get_load_format("dummy").load(model, tmp_path)
    proj = model.model.layers[0].mlp.down_proj
    assert proj.weight.dtype == torch.float8_e4m3fn and proj.weight.float().abs().max() > 0
    assert torch.equal(
        proj.weight_dequant,
        naive_dequant(proj.weight, proj.weight_scale_inv, BLOCK).to(torch.bfloat16),
    )
    assert torch.isfinite(logits(model, IDS)).all()


def test_modules_to_not_convert_keep_their_layers_unquantized(pair):
    hf = pair[0]
    model = fp8_model(hf, modules_to_not_convert=["down_proj"])
    mlp = model.model.layers[1].mlp
    assert mlp.down_proj.quant is None and mlp.down_proj.weight.dtype == torch.float32
    assert not hasattr(mlp.down_proj, "weight_scale_inv")
    assert mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    state = fp8_state_dict(hf, not_converted=("down_proj",))
    assert model.load_weights(state.items()) == set(model.checkpoint_names())


@pytest.mark.gpu
def test_gpu_updates_are_fresh_loads_and_memory_stays_flat(pair, tmp_path):
    device = torch.device("cuda", 0)
    states = [fp8_state_dict(hf) for hf in pair]
    config = fp8_model_config(pair[0])

    def build():
        return build_model(config, tp=TensorParallel(), dtype=torch.bfloat16, device=device)

    fresh = []
    for state in states:
        model = build()
        model.load_weights(state.items())
        model.process_weights_after_loading()
        fresh.append(snapshot(model))
        del model
    model = build()
    get_load_format("dummy").load(model, tmp_path)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(device)
    for step, which in enumerate([0, 1, 0, 1]):
        for bucket in in_buckets(states[which], seed=step):
            model.load_weights([(n, t.to(device)) for n, t in bucket])
        model.process_weights_after_loading()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(device) == baseline
        assert same_bits(snapshot(model), fresh[which])
