"""A vLLM model seen as checkpoint tensors, so that the fork machinery of
``workers.remote_instance`` (manifest, plan, send, receive) runs on vLLM models unchanged.

The one declared mapping between vLLM's parameters and checkpoint tensors is ``FUSED`` (vLLM's
fused parameters and the checkpoint tensors they join, with vLLM's shard ids) plus ``layout_of``
(vLLM's tensor-parallel layer classes -> our ``ShardLayout``: the TP dim, the parts, how each part
is cut over the ranks, KV-head replication included). From these, ``VllmCheckpointView`` offers
what a fork needs of a model (``CheckpointWeights``): parameter names, their layouts, checkpoint
names (``qkv_proj`` <-> ``q_proj``/``k_proj``/``v_proj``, ``gate_up_proj`` <-> ``gate_proj``/
``up_proj``), the checkpoint tensors gathered over vLLM's TP group, and the model config as our
reference server records it (``ModelConfig`` from the checkpoint's config.json), so that a vLLM
manifest and a reference-server manifest of the same checkpoint compare equal.

A vLLM model at rest is in kernel format: on CPU, unquantized linear layers repack their weight
for oneDNN in ``process_weights_after_loading`` and leave ``layer.weight`` empty. A seed view
(``effective=True``) recovers each such weight (``reload.effective_weight``: a copy, held while
the view lives); elsewhere (GPU, unrepacked layers) a view's tensors are the parameters
themselves. A client view is built on a freshly created model, before any load: its tensors are
the parameters in checkpoint format, received into in place.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from workers.errors import ConfigError, WorkersError
from workers.layers.sharding import Part, ShardLayout
from workers.models.config import ModelConfig
from workers.models.weights import CheckpointWeights
from workers.vllm.experts import moe_layers
from workers.vllm.reload import effective_weight

# vLLM's fused parameters: fused module -> ((checkpoint module, vLLM's shard id), ...), in the
# order the parts are concatenated along the output dim.
FUSED: dict[str, tuple[tuple[str, Any], ...]] = {
    "qkv_proj": (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")),
    "gate_up_proj": (("gate_proj", 0), ("up_proj", 1)),
}
# The same, the way CheckpointWeights reads it: checkpoint module -> (fused module, shard id).
PACKED = {ckpt: (fused, sid) for fused, parts in FUSED.items() for ckpt, sid in parts}
# config.json entries that differ between copies of one checkpoint (a raw-config manifest)
VOLATILE_CONFIG = ("_name_or_path", "transformers_version")


class VllmTP:
    """vLLM's tensor-parallel group, as the fork code uses a TP group (rank, size, gather)."""

    def __init__(self) -> None:
        from vllm.distributed.parallel_state import get_tp_group

        self._group = get_tp_group()
        self.rank = self._group.rank_in_group
        self.size = self._group.world_size

    def all_gather_list(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.size == 1:
            return [x]
        x = x.contiguous()
        group = self._group.cpu_group if x.device.type == "cpu" else self._group.device_group
        out = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(out, x, group=group)
        return out


def layout_of(
    pname: str, module: torch.nn.Module, attr: str, param: torch.Tensor, shape: tuple, tp
) -> ShardLayout:
    """The ``ShardLayout`` of vLLM parameter ``pname`` (``module``'s ``attr``, of checkpoint-
    format ``shape``) on rank ``tp.rank`` of ``tp.size``; ``WorkersError`` for a sharded layer
    this mapping does not declare, or a layout that does not give vLLM's local shape."""
    layout = declared_layout(pname, module, attr, param, shape, tp)
    if layout.local_shape() != tuple(shape):
        raise WorkersError(
            f"{pname}: vLLM holds {list(shape)} on TP rank {tp.rank}, the declared layout "
            f"{list(layout.local_shape())} (vocabulary padding of another size?)"
        )
    return layout


def declared_layout(
    pname: str, module: torch.nn.Module, attr: str, param: torch.Tensor, shape: tuple, tp
) -> ShardLayout:
    """``layout_of`` without its check of the local shape: the parts' sizes along the TP dim
    come from ``module`` alone, the other dims from ``shape``."""
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    rank, size = tp.rank, tp.size
    shape = tuple(shape)

    def rows(n: int) -> tuple[int, ...]:
        return (n, *shape[1:])

    def column(*parts: Part) -> ShardLayout:
        return ShardLayout(dim=0, parts=parts, rank=rank, size=size)

    if getattr(module, "tp_size", size) != size:  # a layer outside TP (disable_tp)
        layout = ShardLayout.replicated(shape)
    elif isinstance(module, QKVParallelLinear) and attr in ("weight", "bias"):
        kv = size // module.num_kv_head_replicas
        layout = column(
            Part("q", rows(module.total_num_heads * module.head_size), size),
            Part("k", rows(module.total_num_kv_heads * module.head_size), kv),
            Part("v", rows(module.total_num_kv_heads * module.v_head_size), kv),
        )
    elif isinstance(module, MergedColumnParallelLinear) and attr in ("weight", "bias"):
        layout = column(*(Part(i, rows(n), size) for i, n in enumerate(module.output_sizes)))
    elif isinstance(module, ColumnParallelLinear) and attr in ("weight", "bias"):
        layout = column(Part(None, rows(module.output_size), size))
    elif isinstance(module, RowParallelLinear) and attr == "weight":
        full = (shape[0], module.input_size, *shape[2:])
        layout = ShardLayout(dim=1, parts=(Part(None, full, size),), rank=rank, size=size)
    elif isinstance(module, VocabParallelEmbedding) and attr == "weight":
        layout = column(Part(None, rows(module.org_vocab_size), size))
    elif not _sharded_elsewhere(module, param, size):
        layout = ShardLayout.replicated(shape)
    else:
        raise WorkersError(
            f"{pname}: no declared layout for {type(module).__name__}.{attr} at TP {size} "
            "(workers.vllm.checkpoint_view.layout_of)"
        )
    return layout


def _sharded_elsewhere(module, param, size: int) -> bool:
    """A parameter of a TP layer that ``layout_of`` does not declare (vLLM marks sharded dims
    with ``output_dim`` / ``input_dim``)."""
    from vllm.model_executor.layers.linear import ReplicatedLinear, RowParallelLinear

    if size == 1 or isinstance(module, ReplicatedLinear | RowParallelLinear):
        return False
    return (
        getattr(param, "output_dim", None) is not None
        or getattr(param, "input_dim", None) is not None
    )


@dataclasses.dataclass(frozen=True)
class RawConfig:
    """config.json as it is (minus VOLATILE_CONFIG), for architectures ModelConfig does not
    read: such manifests compare between vLLM instances only."""

    hf: dict


def config_record(model_config: Any):
    """``ModelConfig`` of the checkpoint (what the reference server records), else RawConfig."""
    path = Path(str(model_config.model))
    try:
        return ModelConfig.from_pretrained(path)
    except ConfigError:
        raw = model_config.hf_config.to_dict()
        return RawConfig(
            {
                k: v
                for k, v in json.loads(json.dumps(raw, default=str)).items()
                if k not in VOLATILE_CONFIG
            }
        )


class VllmCheckpointView(CheckpointWeights):
    """A vLLM model as the fork code sees a model (see the module doc)."""

    packed_modules_mapping = PACKED

    def __init__(self, model: torch.nn.Module, model_config: Any, *, effective: bool) -> None:
        self.vllm_model = model
        self.tp = VllmTP()
        self.config = config_record(model_config)
        for fused, parts in getattr(model, "packed_modules_mapping", {}).items():
            if [c for c, _ in FUSED.get(fused, ())] != list(parts):
                raise WorkersError(
                    f"{type(model).__name__} fuses {fused} = {list(parts)}: not declared in "
                    "workers.vllm.checkpoint_view.FUSED"
                )
        experts = {id(layer) for layer in moe_layers(model)}
        for prefix, module in model.named_modules():
            if id(module) not in experts:
                continue
            raise WorkersError(
                f"{prefix}.w13_weight: fused MoE experts have no "
                "declared fork layout (workers.vllm.checkpoint_view): the vLLM fork does not "
                "serve MoE models"
            )
        modules = dict(model.named_modules())
        self._tensors: dict[str, torch.Tensor] = {}
        for pname, param in model.named_parameters():
            prefix, _, attr = pname.rpartition(".")
            module = modules[prefix]
            tensor = effective_weight(module, attr, param) if effective else param.detach()
            tensor.shard_layout = layout_of(pname, module, attr, param, tensor.shape, self.tp)
            self._tensors[pname] = tensor

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._tensors.items())

    def parameters(self):
        return iter(self._tensors.values())

    def named_buffers(self) -> list:
        """None compared: vLLM's buffers are derived state, rebuilt by vLLM itself."""
        return []

    def load_weights(self, weights) -> list[str]:
        """Full checkpoint tensors through vLLM's own loaders (each rank keeps its slice)."""
        weights = list(weights)
        self.vllm_model.load_weights(weights)
        return [name for name, _ in weights]

    def process_weights_after_loading(self) -> None:
        """Nothing: vLLM's ``BaseModelLoader.load_model`` runs vLLM's post-load processing once,
        after the loader's ``load_weights`` returns."""
