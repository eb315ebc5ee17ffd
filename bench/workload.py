"""The comparison workload (../shared/bench/anchor_ckpt_engine.py), as pure functions.

A dense bf16 decoder checkpoint: per layer qkv 6144x4096, o 4096x4096, gate_up 24576x4096,
down 4096x12288 and two 4096 norms, layers added until the total reaches `gib` GiB (16 GiB gives
270 tensors, 17.37 GB). Tensor i holds `randn` from a generator seeded with i, so every process
can rebuild any tensor (and its expected shard) without exchanging it. Each torchrun rank owns the
tensors with `i % world == rank`; each colocated worker keeps the row shard `shard(t, rank, world)`.
"""

from __future__ import annotations

import torch

_PER_LAYER = (
    ("qkv", (6144, 4096)),
    ("o", (4096, 4096)),
    ("gate_up", (24576, 4096)),
    ("down", (4096, 12288)),
    ("ln1", (4096,)),
    ("ln2", (4096,)),
)


def spec_for(gib: float, shrink: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the workload's tensors, in order, for a checkpoint of `gib` GiB.

    `shrink` > 1 divides every dimension (small tensors for CPU smoke tests)."""
    out: list[tuple[str, tuple[int, ...]]] = []
    total, layer = 0, 0
    while total < gib * (1 << 30):
        for name, full in _PER_LAYER:
            shape = tuple(max(1, d // shrink) for d in full)
            out.append((f"layers.{layer}.{name}", shape))
            total += torch.Size(shape).numel() * 2
        layer += 1
    return out


def total_bytes(spec: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(torch.Size(s).numel() * 2 for _, s in spec)


def gen(idx: int, shape: tuple[int, ...], device: str | torch.device = "cpu") -> torch.Tensor:
    """Tensor `idx` of the workload: deterministic bf16 random values."""
    g = torch.Generator(device=device).manual_seed(idx)
    return torch.randn(shape, generator=g, device=device).to(torch.bfloat16)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The tensor-parallel row shard a worker keeps (1-d tensors are replicated)."""
    if t.dim() == 1:
        return t
    rows = t.shape[0] // world
    return t.narrow(0, rank * rows, rows)


def owned(spec: list[tuple[str, tuple[int, ...]]], rank: int, world: int) -> list[int]:
    """Indices of the tensors rank `rank` registers (round robin, as the anchor does)."""
    return [i for i in range(len(spec)) if i % world == rank]
