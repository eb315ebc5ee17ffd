"""Tensor-parallel layers in one process: every rank of size n is built side by side (no process
group), loaded from full tensors, and checked against the unsharded computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.distributed import TensorParallel
from workers.errors import ConfigError, WeightCheckError
from workers.layers import (
    ColumnParallelLinear,
    KVCache,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RMSNorm,
    RopeParams,
    RotaryEmbedding,
    RowParallelLinear,
    ShardLayout,
    VocabParallelEmbedding,
    apply_rotary,
    cached_attention,
)
from workers.layers.rotary import inv_frequencies


def ranks(size: int) -> list[TensorParallel]:
    return [TensorParallel(rank=r, size=size) for r in range(size)]


def load_all(layers, full: dict, bias: dict | None = None) -> None:
    for layer in layers:
        for sid, tensor in full.items():
            layer.weight.weight_loader(layer.weight, tensor, sid)
        for sid, tensor in (bias or {}).items():
            layer.bias.weight_loader(layer.bias, tensor, sid)


def unshard(layers, attr: str = "weight") -> dict:
    params = [getattr(layer, attr) for layer in layers]
    return params[0].shard_layout.unshard([p.data for p in params])


@pytest.mark.parametrize("size", [1, 2, 4])
def test_column_parallel_round_trip_and_forward(size):
    w, b, x = torch.randn(8, 5), torch.randn(8), torch.randn(3, 5)
    layers = [ColumnParallelLinear(5, 8, bias=True, tp=tp) for tp in ranks(size)]
    load_all(layers, {None: w}, {None: b})
    assert torch.equal(unshard(layers)[None], w)
    assert torch.equal(unshard(layers, "bias")[None], b)
    out = torch.cat([layer(x) for layer in layers], dim=-1)
    torch.testing.assert_close(out, F.linear(x, w, b))


@pytest.mark.parametrize("size", [1, 2, 4])
def test_row_parallel_partial_sums(size):
    w, b, x = torch.randn(6, 8), torch.randn(6), torch.randn(3, 8)
    layers = [RowParallelLinear(8, 6, bias=True, tp=tp) for tp in ranks(size)]
    load_all(layers, {None: w}, {None: b})
    assert torch.equal(unshard(layers)[None], w)
    chunks = x.chunk(size, dim=-1)
    partial = sum(F.linear(c, layer.weight) for c, layer in zip(chunks, layers))
    torch.testing.assert_close(partial + layers[0].bias, F.linear(x, w, b))


@pytest.mark.parametrize("size", [1, 2, 4])
def test_merged_column_parallel_shards(size):
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    layers = [MergedColumnParallelLinear(4, [8, 8], bias=False, tp=tp) for tp in ranks(size)]
    load_all(layers, {1: up, 0: gate})  # any order
    got = unshard(layers)
    assert torch.equal(got[0], gate) and torch.equal(got[1], up)
    x = torch.randn(2, 4)
    for layer in layers:
        g, u = layer(x).chunk(2, dim=-1)
        r = layer.tp.rank
        torch.testing.assert_close(g, F.linear(x, gate.chunk(size)[r]))
        torch.testing.assert_close(u, F.linear(x, up.chunk(size)[r]))


@pytest.mark.parametrize(
    "size, kv_heads, expected_kv_head",
    [
        (1, 2, [[0, 1]]),
        (2, 2, [[0], [1]]),
        (4, 4, [[0], [1], [2], [3]]),
        (2, 1, [[0], [0]]),  # one KV head replicated on both ranks
        (4, 2, [[0], [0], [1], [1]]),
    ],
)
def test_qkv_split_and_replication(size, kv_heads, expected_kv_head):
    heads, head_dim, hidden = 4, 3, 5
    q = torch.randn(heads * head_dim, hidden)
    k = torch.randn(kv_heads * head_dim, hidden)
    v = torch.randn(kv_heads * head_dim, hidden)
    layers = [
        QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=False, tp=tp)
        for tp in ranks(size)
    ]
    load_all(layers, {"v": v, "q": q, "k": k})
    got = unshard(layers)
    assert all(torch.equal(got[s], t) for s, t in (("q", q), ("k", k), ("v", v)))
    for layer, kv_idx in zip(layers, expected_kv_head):
        local = layer.weight.data
        q_rows = layer.num_heads * head_dim
        k_local = local[q_rows : q_rows + layer.num_kv_heads * head_dim]
        want = torch.cat([k[i * head_dim : (i + 1) * head_dim] for i in kv_idx])
        assert torch.equal(k_local, want)


@pytest.mark.parametrize("vocab, size", [(10, 1), (10, 2), (10, 4), (7, 4)])
def test_vocab_parallel_embedding_pads_and_looks_up(vocab, size):
    w = torch.randn(vocab, 3)
    layers = [VocabParallelEmbedding(vocab, 3, tp=tp) for tp in ranks(size)]
    for layer in layers:
        layer.weight.data.fill_(float("nan"))  # padding rows must be written (zeroed) too
        layer.weight.weight_loader(layer.weight, w, None)
    assert torch.equal(unshard(layers)[None], w)
    assert not any(torch.isnan(layer.weight).any() for layer in layers)
    ids = torch.arange(vocab)
    if size == 1:
        torch.testing.assert_close(layers[0](ids), w)
    else:  # the sum of every rank's masked lookup is the lookup
        parts = []
        for layer in layers:
            local = ids - layer.start
            outside = (local < 0) | (local >= layer.rows)
            y = F.embedding(local.masked_fill(outside, 0), layer.weight)
            parts.append(y.masked_fill(outside[:, None], 0))
        torch.testing.assert_close(sum(parts), w)


def test_shape_mismatch_is_refused_before_writing():
    layer = ColumnParallelLinear(5, 8, bias=False, tp=TensorParallel())
    layer.weight.data.zero_()
    with pytest.raises(WeightCheckError, match=r"\(8, 4\).*\(8, 5\)"):
        layer.weight.weight_loader(layer.weight, torch.ones(8, 4), None)
    assert not layer.weight.any()


@pytest.mark.parametrize(
    "build",
    [
        lambda tp: ColumnParallelLinear(4, 6, bias=False, tp=tp),
        lambda tp: RowParallelLinear(6, 4, bias=False, tp=tp),
        lambda tp: QKVParallelLinear(8, 2, 6, 2, bias=False, tp=tp),
        lambda tp: QKVParallelLinear(8, 2, 8, 3, bias=False, tp=tp),
    ],
    ids=["column", "row", "heads", "kv-heads"],
)
def test_sizes_that_do_not_divide_are_config_errors(build):
    with pytest.raises(ConfigError, match=r"tensor-parallel size|replicated"):
        build(TensorParallel(rank=0, size=4))


def test_layout_validation():
    with pytest.raises(ValueError):
        ShardLayout(dim=None, parts=())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    x = torch.randn(4, 16, dtype=dtype)
    weight = 1 + 0.1 * torch.randn(16)
    ours = RMSNorm(16, 1e-6).to(dtype)
    ref = Qwen3RMSNorm(16, eps=1e-6).to(dtype)
    ours.weight.data.copy_(weight)
    ref.weight.data.copy_(weight)
    assert torch.equal(ours(x), ref(x))


ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "theta": {"rope_type": "default", "rope_theta": 1e6},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize("seq_len", [None, 600])
def test_rope_frequencies_match_transformers(case, seq_len):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = ROPE_CASES[case]
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_parameters=rope
    )
    ours = RopeParams(
        rope_type=rope["rope_type"],
        theta=rope["rope_theta"],
        factor=rope.get("factor", 1.0),
        low_freq_factor=rope.get("low_freq_factor", 1.0),
        high_freq_factor=rope.get("high_freq_factor", 4.0),
        original_max_position=rope.get("original_max_position_embeddings"),
        max_position=256,
    )
    if rope["rope_type"] == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        want = LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0]
    else:
        want = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, None, seq_len=seq_len)[0]
    torch.testing.assert_close(inv_frequencies(ours, 16, seq_len), want, rtol=1e-6, atol=0)


def test_apply_rotary_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rope = RotaryEmbedding(8, RopeParams(theta=10000.0))
    positions = torch.arange(5, 10)
    cos, sin = rope(positions, torch.float32)
    q, k = torch.randn(5, 3, 8), torch.randn(5, 2, 8)
    want_q, want_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None]
    )
    torch.testing.assert_close(apply_rotary(q, cos, sin), want_q[0].transpose(0, 1))
    torch.testing.assert_close(apply_rotary(k, cos, sin), want_k[0].transpose(0, 1))


@pytest.mark.parametrize("chunks", [[9], [4, 5], [4, 1, 1, 3], [1] * 9])
def test_cached_attention_any_chunking_equals_one_pass(chunks):
    torch.manual_seed(0)
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)

    def run(splits):
        cache = KVCache(
            num_layers=1,
            capacity=9,
            num_kv_heads=2,
            head_dim=8,
            dtype=torch.float32,
            device=torch.device("cpu"),
        )
        outs, start = [], 0
        for n in splits:
            sl = slice(start, start + n)
            outs.append(
                cached_attention(q[sl], k[sl], v[sl], cache=cache, layer=0, start=start, scale=0.3)
            )
            start += n
        return torch.cat(outs)

    torch.testing.assert_close(run(chunks), run([9]))
    with pytest.raises(ValueError, match="KV cache"):
        cache = KVCache(
            num_layers=1,
            capacity=2,
            num_kv_heads=2,
            head_dim=8,
            dtype=torch.float32,
            device=torch.device("cpu"),
        )
        cached_attention(q, k, v, cache=cache, layer=0, start=0, scale=0.3)
