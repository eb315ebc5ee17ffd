"""Tensor-parallel building blocks of the reference model; each parameter carries a
`shard_layout` and a `weight_loader` (see `sharding`)."""

from workers.layers.attention import KVCache, cached_attention
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from workers.layers.norm import RMSNorm
from workers.layers.rotary import ROPE_TYPES, RopeParams, RotaryEmbedding, apply_rotary
from workers.layers.sharding import Part, ShardId, ShardLayout, make_param

__all__ = [
    "ROPE_TYPES",
    "ColumnParallelLinear",
    "KVCache",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "Part",
    "QKVParallelLinear",
    "RMSNorm",
    "RopeParams",
    "RotaryEmbedding",
    "RowParallelLinear",
    "ShardId",
    "ShardLayout",
    "VocabParallelEmbedding",
    "apply_rotary",
    "cached_attention",
    "make_param",
]
