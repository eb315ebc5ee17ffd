"""The decoder of the Llama, Qwen3 and Qwen3-MoE families, tensor-parallel.

Module and parameter names mirror the Hugging Face checkpoints (`model.layers.N.self_attn...`),
except for the fused `qkv_proj` and `gate_up_proj`, mapped by `packed_modules_mapping`. Covers
grouped-query attention, RoPE (theta + scaling), RMSNorm, SwiGLU, Qwen3's per-head q/k norms,
attention/MLP biases, tied or untied embeddings, and block-FP8 linear weights when config.json
carries a `quantization_config` (`layers.fp8`; each layer is told its checkpoint module names so
`modules_to_not_convert` applies). Qwen3-MoE's sparse layers hold a `layers.moe.SparseMoeBlock`
as `mlp`; `MoeDecoderForCausalLM` declares the expert mapping that loads each expert's checkpoint
tensors into the fused expert parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.distributed import TensorParallel
from workers.layers import (
    KVCache,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    apply_rotary,
    cached_attention,
)
from workers.layers.fp8 import layer_quant
from workers.layers.moe import SparseMoeBlock, expert_params_mapping
from workers.models.config import ModelConfig
from workers.models.weights import CheckpointWeights


class DecoderAttention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, prefix: str = "") -> None:
        super().__init__()
        c, q = config, config.quantization
        self.qkv_proj = QKVParallelLinear(
            c.hidden_size,
            c.head_dim,
            c.num_heads,
            c.num_kv_heads,
            bias=c.attention_bias,
            tp=tp,
            quant=layer_quant(q, *(f"{prefix}.{m}_proj" for m in "qkv")),
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            c.num_heads * c.head_dim,
            c.hidden_size,
            bias=c.attention_bias,
            tp=tp,
            quant=layer_quant(q, f"{prefix}.o_proj"),
            prefix=f"{prefix}.o_proj",
        )
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.qk_norm = c.qk_norm
        self.heads, self.kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = c.head_dim
        self.scale = c.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        layer: int,
        start: int,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(tokens, self.heads, self.head_dim)
        k = k.view(tokens, self.kv_heads, self.head_dim)
        v = v.view(tokens, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        out = cached_attention(q, k, v, cache=cache, layer=layer, start=start, scale=self.scale)
        return self.o_proj(out)


class DecoderMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, prefix: str = "") -> None:
        super().__init__()
        c, q = config, config.quantization
        self.gate_up_proj = MergedColumnParallelLinear(
            c.hidden_size,
            [c.intermediate_size] * 2,
            bias=c.mlp_bias,
            tp=tp,
            quant=layer_quant(q, f"{prefix}.gate_proj", f"{prefix}.up_proj"),
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            c.intermediate_size,
            c.hidden_size,
            bias=c.mlp_bias,
            tp=tp,
            quant=layer_quant(q, f"{prefix}.down_proj"),
            prefix=f"{prefix}.down_proj",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, tp: TensorParallel, prefix: str = "", index: int = 0
    ) -> None:
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = DecoderAttention(c, tp, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.is_moe_layer(index):
            self.mlp = SparseMoeBlock(
                c.hidden_size,
                c.moe_intermediate_size,
                c.num_experts,
                c.num_experts_per_tok,
                c.norm_topk_prob,
                tp=tp,
            )
        else:
            self.mlp = DecoderMLP(c, tp, f"{prefix}.mlp")

    def forward(self, x, cos_sin, cache: KVCache, layer: int, start: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp=tp)
        self.layers = nn.ModuleList(
            DecoderLayer(config, tp, f"model.layers.{i}", i) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope)

    def forward(self, input_ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        positions = torch.arange(start, start + input_ids.shape[0], device=input_ids.device)
        cos_sin = self.rotary_emb(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos_sin, cache, i, start)
        return self.norm(x)


class DenseDecoderForCausalLM(nn.Module, CheckpointWeights):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = DecoderModel(config, tp)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp=tp, tied_to=tied)
        # A tied checkpoint may still carry lm_head.weight (a copy of the embedding): skip it.
        self.aliased_names = frozenset({"lm_head.weight"} if tied is not None else ())

    def new_cache(self, capacity: int) -> KVCache:
        attn = self.model.layers[0].self_attn
        weight = self.model.embed_tokens.weight
        return KVCache(
            num_layers=len(self.model.layers),
            capacity=capacity,
            num_kv_heads=attn.kv_heads,
            head_dim=attn.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    def forward(self, input_ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Logits [tokens, vocab] for positions start..start+len(input_ids)-1 (every rank)."""
        return self.lm_head(self.model(input_ids, cache, start))


class MoeDecoderForCausalLM(DenseDecoderForCausalLM):
    """Qwen3-MoE: the decoder with sparse MLP layers; each expert's checkpoint tensors
    (`mlp.experts.<e>.{gate,up,down}_proj.weight`) load into the fused expert parameters
    through the declared `expert_params_mapping` (`layers.moe`)."""

    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__(config, tp)
        self.expert_params_mapping = expert_params_mapping(config.num_experts)
