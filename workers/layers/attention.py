"""Causal self-attention over a per-request KV cache (one sequence at a time, no batching).

The cache is preallocated for the request's full length (prompt + new tokens), so decoding never
reallocates; grouped-query attention repeats each KV head for its group of query heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Per-layer key/value storage: [capacity, local KV heads, head_dim] each."""

    def __init__(
        self,
        *,
        num_layers: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (capacity, num_kv_heads, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cache: KVCache,
    layer: int,
    start: int,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KV, D] for positions start..start+T-1; returns [T, H*D].

    Writes k/v into the cache, then attends causally over positions 0..start+T-1."""
    tokens, heads, head_dim = q.shape
    end = start + tokens
    if end > cache.capacity:
        raise ValueError(f"KV cache holds {cache.capacity} positions, asked for {end}")
    cache.keys[layer][start:end] = k
    cache.values[layer][start:end] = v
    keys, values = cache.keys[layer][:end], cache.values[layer][:end]
    groups = heads // keys.shape[1]
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    mask, causal = None, False
    if start == 0:
        causal = tokens > 1
    elif tokens > 1:  # a chunk after a cached prefix: query i sees keys 0..start+i
        offsets = torch.arange(end, device=q.device)[None, :]
        mask = offsets <= (start + torch.arange(tokens, device=q.device))[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
    )
    return out.squeeze(0).transpose(0, 1).reshape(tokens, heads * head_dim)
