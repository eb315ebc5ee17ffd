"""Tensor-parallel linear layers (Megatron style): column-parallel ones keep their output sharded,
row-parallel ones take a sharded input and all-reduce. Each declares a `ShardLayout` per
parameter; weight loading, unsharding and shape checks follow from it (`layers.sharding`).

With `quant` (an `Fp8Config`), a layer holds its weight in the checkpoint's block-FP8 layout
(`weight` + `weight_scale_inv`, written by loads) and multiplies with `weight_dequant`, which its
`process_weights_after_loading` recomputes after each load or update (`layers.fp8`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.distributed import TensorParallel
from workers.errors import ConfigError
from workers.layers.fp8 import Fp8Config, dequantize_sharded, fp8_params
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
        quant: Fp8Config | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.tp = tp
        self.quant = quant
        w_parts = tuple(Part(sid, (out, input_size), chunks) for sid, out, chunks in parts)
        layout = ShardLayout(dim, w_parts, tp.rank, tp.size)
        if quant is None:
            self.weight = make_param(layout)
        else:
            self.weight, self.weight_scale_inv = fp8_params(layout, quant, prefix or "linear")
            # The forward weight: allocated once, refilled in place after every load.
            dequant = torch.zeros(layout.local_shape())
            self.register_buffer("weight_dequant", dequant, persistent=False)
        if not bias:
            self.bias = None
        elif dim == 0:
            b_parts = tuple(Part(sid, (out,), chunks) for sid, out, chunks in parts)
            self.bias = make_param(ShardLayout(0, b_parts, tp.rank, tp.size))
        else:  # row-parallel: the bias is added once, after the all-reduce
            self.bias = make_param(ShardLayout.replicated((sum(p[1] for p in parts),)))

    @property
    def forward_weight(self) -> torch.Tensor:
        return self.weight if self.quant is None else self.weight_dequant

    def process_weights_after_loading(self) -> None:
        """Recompute the forward weight from the loaded (checkpoint-layout) parameters; in
        place, idempotent; a no-op for unquantized layers."""
        if self.quant is not None:
            block = self.quant.weight_block_size
            dequantize_sharded(self.weight_dequant, self.weight, self.weight_scale_inv, block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.forward_weight, self.bias)


class _SinglePartLinear(_ShardedLinear):
    """One projection split along `split_dim` (0: output features, 1: input features)."""

    split_dim: int

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool,
        tp: TensorParallel,
        quant: Fp8Config | None = None,
        prefix: str = "",
    ) -> None:
        if self.split_dim == 0:
            _check_divisible(output_size, tp.size, "output features")
        else:
            _check_divisible(input_size, tp.size, "input features")
        parts = [(None, output_size, tp.size)]
        super().__init__(
            input_size, parts, bias=bias, tp=tp, dim=self.split_dim, quant=quant, prefix=prefix
        )


class ColumnParallelLinear(_SinglePartLinear):
    """Output features split over the ranks; the output stays sharded."""

    split_dim = 0


class MergedColumnParallelLinear(_ShardedLinear):
    """Several column-parallel projections of one input fused into one matmul (gate_up_proj);
    the checkpoint tensors are its shards 0, 1, ..."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        *,
        bias: bool,
        tp: TensorParallel,
        quant: Fp8Config | None = None,
        prefix: str = "",
    ) -> None:
        for size in output_sizes:
            _check_divisible(size, tp.size, "output features")
        parts = [(i, size, tp.size) for i, size in enumerate(output_sizes)]
        super().__init__(input_size, parts, bias=bias, tp=tp, dim=0, quant=quant, prefix=prefix)
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
        quant: Fp8Config | None = None,
        prefix: str = "",
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
        super().__init__(hidden_size, parts, bias=bias, tp=tp, dim=0, quant=quant, prefix=prefix)
        self.num_heads = num_heads // tp.size  # local
        self.num_kv_heads = max(1, num_kv_heads // tp.size)  # local
        self.head_dim = head_dim


class RowParallelLinear(_SinglePartLinear):
    """Input features split over the ranks; partial outputs are summed over the group."""

    split_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.forward_weight))
        return y if self.bias is None else y + self.bias


def _check_divisible(n: int, size: int, what: str) -> None:
    if n % size:
        raise ConfigError(f"{n} {what} do not divide by the tensor-parallel size {size}")
