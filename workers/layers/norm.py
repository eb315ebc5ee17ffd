"""RMSNorm, computed in float32 and cast back before the weight, as Llama and Qwen3 define it."""

from __future__ import annotations

import torch
from torch import nn

from workers.layers.sharding import ShardLayout, make_param


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = make_param(ShardLayout.replicated((hidden_size,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
