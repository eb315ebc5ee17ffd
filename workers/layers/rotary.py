"""Rotary position embedding (rotate-half layout, as Llama and Qwen3 checkpoints expect) with the
configured theta and the scalings these families ship: default, linear, dynamic (NTK) and llama3.

Frequencies are computed in float32 exactly as `transformers` computes them; cos/sin are cast to
the activations' dtype before use, as there. `dynamic` rescales the base from the longest position
of each forward call, which equals `transformers`' behaviour for generation with a KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from workers.errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True, kw_only=True)
class RopeParams:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int | None = None
    max_position: int = 2048

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ConfigError(f"rope theta and factor must be positive: {self}")


def inv_frequencies(params: RopeParams, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
    """1 / theta^(2i/d) for i < d/2, scaled per `params.rope_type` (float32, CPU)."""
    base = params.theta
    if params.rope_type == "dynamic":
        seq_len = max(seq_len or 0, params.max_position)
        scale = params.factor * seq_len / params.max_position - (params.factor - 1)
        base = base * scale ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if params.rope_type == "linear":
        return inv_freq / params.factor
    if params.rope_type == "llama3":
        return _llama3_scaling(inv_freq, params)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, p: RopeParams) -> torch.Tensor:
    old_len = p.original_max_position or p.max_position
    low_wavelen, high_wavelen = old_len / p.low_freq_factor, old_len / p.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / p.factor, inv_freq)
    smooth = (old_len / wavelen - p.low_freq_factor) / (p.high_freq_factor - p.low_freq_factor)
    smoothed = (1 - smooth) * scaled / p.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions; `apply_rotary` uses them on q and k."""

    def __init__(self, head_dim: int, params: RopeParams) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.params = params
        self.register_buffer("inv_freq", inv_frequencies(params, head_dim), persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.params.rope_type == "dynamic":
            seq_len = int(positions.max().item()) + 1
            inv_freq = inv_frequencies(self.params, self.head_dim, seq_len).to(positions.device)
        freqs = positions.float()[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
