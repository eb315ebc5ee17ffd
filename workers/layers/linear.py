"""Tensor-parallel linear layers (Megatron style): column-parallel ones keep their output sharded,
row-parallel ones take a sharded input and all-reduce. Each declares a `ShardLayout` per
parameter; weight loading, unsharding and shape checks follow from it (`layers.sharding`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.distributed import TensorParallel
from workers.errors import ConfigError
from workers.layers.sharding import Part, ShardId, ShardLayout, make_param


class _ShardedLinear(nn.Module):
    """y = x W^T (+ b) with W split along `dim` into the given (shard id, out size, chunks) parts."""

    def __init__(
        self,
        input_size: int,
        parts: list[tuple[ShardId, int, int]],
        *,
        bias: bool,
        tp: TensorParallel,
        dim: int,
    ) -> None:
        super().__init__()
        self.tp = tp
        w_parts = tuple(Part(sid, (out, input_size), chunks) for sid, out, chunks in parts)
        self.weight = make_param(ShardLayout(dim, w_parts, tp.rank, tp.size))
        if not bias:
            self.bias = None
        elif dim == 0:
            b_parts = tuple(Part(sid, (out,), chunks) for sid, out, chunks in parts)
            self.bias = make_param(ShardLayout(0, b_parts, tp.rank, tp.size))
        else:  # row-parallel: the bias is added once, after the all-reduce
            self.bias = make_param(ShardLayout.replicated((sum(p[1] for p in parts),)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(_ShardedLinear):
    """Output features split over the ranks; the output stays sharded."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool, tp: TensorParallel):
        _check_divisible(output_size, tp.size, "output features")
        super().__init__(input_size, [(None, output_size, tp.size)], bias=bias, tp=tp, dim=0)


class MergedColumnParallelLinear(_ShardedLinear):
    """Several column-parallel projections of one input fused into one matmul (gate_up_proj);
    the checkpoint tensors are its shards 0, 1, ..."""

    def __init__(
        self, input_size: int, output_sizes: list[int], *, bias: bool, tp: TensorParallel
    ) -> None:
        for size in output_sizes:
            _check_divisible(size, tp.size, "output features")
        parts = [(i, size, tp.size) for i, size in enumerate(output_sizes)]
        super().__init__(input_size, parts, bias=bias, tp=tp, dim=0)
        self.output_sizes = [size // tp.size for size in output_sizes]


class QKVParallelLinear(_ShardedLinear):
    """q, k and v projections fused (shards "q", "k", "v"), split by heads. With fewer KV heads
    than ranks, each KV head is replicated on `size // num_kv_heads` ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool,
        tp: TensorParallel,
    ) -> None:
        _check_divisible(num_heads, tp.size, "attention heads")
        if num_kv_heads >= tp.size:
            _check_divisible(num_kv_heads, tp.size, "key/value heads")
            kv_chunks = tp.size
        elif tp.size % num_kv_heads:
            raise ConfigError(
                f"{num_kv_heads} key/value heads cannot be replicated over TP size {tp.size}"
            )
        else:
            kv_chunks = num_kv_heads
        parts = [
            ("q", num_heads * head_dim, tp.size),
            ("k", num_kv_heads * head_dim, kv_chunks),
            ("v", num_kv_heads * head_dim, kv_chunks),
        ]
        super().__init__(hidden_size, parts, bias=bias, tp=tp, dim=0)
        self.num_heads = num_heads // tp.size  # local
        self.num_kv_heads = max(1, num_kv_heads // tp.size)  # local
        self.head_dim = head_dim


class RowParallelLinear(_ShardedLinear):
    """Input features split over the ranks; partial outputs are summed over the group."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool, tp: TensorParallel):
        _check_divisible(input_size, tp.size, "input features")
        super().__init__(input_size, [(None, output_size, tp.size)], bias=bias, tp=tp, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def _check_divisible(n: int, size: int, what: str) -> None:
    if n % size:
        raise ConfigError(f"{n} {what} do not divide by the tensor-parallel size {size}")
