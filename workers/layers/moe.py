"""Mixture-of-experts layers: the top-k router and the fused experts, tensor-parallel.

Checkpoints store every expert as separate tensors (`mlp.experts.<e>.{gate,up,down}_proj.weight`,
router `mlp.gate.weight`). The model holds them fused, as transformers does in memory:
`experts.gate_up_proj` [num_experts, 2 * inter, hidden] and `experts.down_proj`
[num_experts, hidden, inter]. `EXPERT_WEIGHTS` is the one declared table from checkpoint names to
(fused parameter, shard id); `expert_params_mapping(num_experts)` expands it for a model's
`CheckpointWeights.expert_params_mapping`, so loading, unsharding, manifests and /weights_info
all go through it.

Tensor parallelism: every expert is split over the TP ranks like the dense MLP, along its
intermediate dim (gate/up by output rows, down by input columns: `StackedLayout` over the same
part layouts as `MergedColumnParallelLinear` / `RowParallelLinear`); each rank runs every routed
expert on its slice and the partial outputs are summed by one all-reduce per layer. The router is
replicated, so every rank picks the same experts. (Expert parallelism, experts spread over
ranks, would move fewer bytes per rank in compute but not in an update: each TP rank keeps
1/TP of every expert either way.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.distributed import TensorParallel
from workers.errors import ConfigError
from workers.layers.sharding import Part, ShardId, ShardLayout, StackedLayout, make_param

# checkpoint module of one expert -> (fused parameter of the experts module, inner shard id)
EXPERT_WEIGHTS: dict[str, tuple[str, ShardId]] = {
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", None),
}


def expert_params_mapping(
    num_experts: int, module: str = "experts"
) -> dict[str, tuple[str, ShardId]]:
    """Checkpoint-name suffix -> (parameter-name suffix, shard id) for every expert, e.g.
    "experts.3.up_proj.weight" -> ("experts.gate_up_proj", (3, 1))."""
    return {
        f"{module}.{e}.{ckpt}.weight": (f"{module}.{fused}", (e, sid))
        for e in range(num_experts)
        for ckpt, (fused, sid) in EXPERT_WEIGHTS.items()
    }


class TopKRouter(nn.Module):
    """`gate.weight` [num_experts, hidden], replicated. Softmax over all experts in float32, the
    top k, renormalised to sum 1 when `norm_topk_prob` (as transformers' Qwen3-MoE)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"num_experts_per_tok {top_k} must be in 1..{num_experts}")
        self.weight = make_param(ShardLayout.replicated((num_experts, hidden_size)))
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [tokens, k] in x's dtype, expert ids [tokens, k])."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return top.to(logits.dtype), ids


class FusedExperts(nn.Module):
    """Every expert's SwiGLU MLP in two stacked parameters, split over TP along the intermediate
    dim; `forward` runs only the experts some token was routed to, then all-reduces."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, num_experts: int, *, tp: TensorParallel
    ):
        super().__init__()
        if intermediate_size % tp.size:
            raise ConfigError(
                f"moe_intermediate_size {intermediate_size} does not divide by the "
                f"tensor-parallel size {tp.size}"
            )
        shape = (intermediate_size, hidden_size)
        gate_up = ShardLayout(
            0, (Part(0, shape, tp.size), Part(1, shape, tp.size)), tp.rank, tp.size
        )
        down = ShardLayout(
            1, (Part(None, (hidden_size, intermediate_size), tp.size),), tp.rank, tp.size
        )
        self.gate_up_proj = make_param(StackedLayout(num_experts, gate_up))
        self.down_proj = make_param(StackedLayout(num_experts, down))
        self.tp = tp
        self.num_experts = num_experts

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(expert_ids).tolist():
            tokens, slot = torch.where(expert_ids == e)
            gate, up = F.linear(x[tokens], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            out.index_add_(0, tokens, y * weights[tokens, slot, None])
        return self.tp.all_reduce(out)


class SparseMoeBlock(nn.Module):
    """Qwen3-MoE's MLP: `gate` (the router) and `experts`, named as the checkpoint's modules."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool,
        *,
        tp: TensorParallel,
    ):
        super().__init__()
        self.gate = TopKRouter(hidden_size, num_experts, top_k, norm_topk_prob)
        self.experts = FusedExperts(hidden_size, intermediate_size, num_experts, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        return self.experts(x, weights, ids)
