"""Block-FP8, pure logic: the format (dequantization, config parsing, modules_to_not_convert) and
the scales sharded with the weights over TP ranks built side by side in one process (see
test_fp8_model.py for the model-level post hook and test_fp8_server.py end to end)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from fp8_testutil import BLOCK, FP8_CONFIG, naive_dequant, quantize_block_fp8

from workers.distributed import TensorParallel
from workers.errors import ConfigError
from workers.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from workers.layers import fp8 as fp8_mod
from workers.layers.fp8 import Fp8Config, dequantize_block_fp8

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
