"""What one vLLM tensor-parallel rank reads of each checkpoint tensor: the ``keeps`` answer of
``ckpt_engine.update_weights_from_ipc`` (a P2P receiver then reads only those rows).

For every tensor of the update, the parameter it loads into (its own name, or the fused parameter
of ``checkpoint_view.FUSED``: ``q_proj`` -> ``qkv_proj`` part ``"q"``, ``gate_proj`` ->
``gate_up_proj`` part 0) and that parameter's declared layout (``checkpoint_view.declared_layout``:
column-, row-, QKV- and merged-column-parallel linears) give ``(dim, start, length)``, the rows
vLLM's weight loader narrows to on this rank; for vocabulary-parallel embeddings and LM heads,
vLLM's own ``shard_indices``. A layout is reported only where its size along the TP dim is the
size vLLM holds per rank (``output_size_per_partition`` / ``input_size_per_partition``), and
only where the parameter loads through its layer's own loader (a CPU-repacked weight, an empty
stand-in at rest, has none; vLLM's reload puts the layer's parameters back before loading).

MoE experts (``expert_keeps``): each per-expert checkpoint tensor of an unquantized
``RoutedExperts`` layer (``<layer>.<expert>.{gate,up,down}_proj.weight``, vLLM's shards ``w1``,
``w3``, ``w2``), as vLLM 0.32's ``RoutedExperts.weight_loader`` narrows it: ``gate_proj`` and
``up_proj`` along dim 0 (the intermediate dim), ``down_proj`` along dim 1 (its input dim), the
``full // tp`` indices from ``rank * (full // tp)``, with the MoE layer's own TP size and rank
(``moe_config``; vLLM flattens DP and PCP into it). Reported only where that piece is the
per-rank size vLLM allocated (``intermediate_size_per_partition``, unpadded), the tensor has
the full checkpoint shape, and the parameter loads through the layer's own loader; quantized
or transposed experts, padded TP sharding, EPLB (experts moved between ranks at run time) and
expert biases are read whole. With expert parallelism, an expert none of whose physical copies
is on this rank is loaded by no loader: it keeps nothing (zero rows); an expert on it is read
whole.

Everything else (norms, any layer not declared, a model with a drafter, TP=1) is left out: read
whole, which is always correct.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from workers.errors import WorkersError
from workers.vllm.checkpoint_view import FUSED, PACKED, VllmTP, declared_layout
from workers.vllm.experts import expected_tensors, moe_layers

Kept = tuple[int, int, int]
# vLLM's expert shard id -> the dim of the checkpoint tensor its loader narrows (SHARD_ID_TO_
# SHARDED_DIM of RoutedExperts.weight_loader): gate_proj, up_proj rows; down_proj columns
EXPERT_DIM = {"w1": 0, "w3": 0, "w2": 1}
# RoutedExperts' methods that decide what its loader reads of a per-expert tensor
LOADER_STEPS = (
    "load_weights",
    "weight_loader",
    "_load_model_weight_or_group_weight_scale",
    "_load_w13",
    "_load_w2",
    "_map_global_expert_id_to_local_expert_id",
)


def model_keeps(model: torch.nn.Module, specs: Iterable) -> dict[str, Kept]:
    """``{checkpoint name: (dim, start, length)}`` for the tensors of ``specs`` (``TensorSpec``:
    name, shape) that this rank of ``model`` loads only part (or none) of; see the module doc."""
    specs = list(specs)
    out = expert_keeps(model, specs)
    tp = VllmTP()
    if tp.size == 1:
        return out
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    fused_ok = {
        fused
        for fused, parts in getattr(model, "packed_modules_mapping", {}).items()
        if [c for c, _ in FUSED.get(fused, ())] == list(parts)
    }
    for spec in specs:
        if spec.name in out:
            continue
        where = _parameter_of(spec.name, params, fused_ok)
        if where is None:
            continue
        pname, sid = where
        prefix, _, attr = pname.rpartition(".")
        module = modules.get(prefix)
        if module is None:
            continue
        kept = _kept(pname, module, attr, params[pname], sid, tuple(spec.shape), tp)
        if kept is not None:
            out[spec.name] = kept
    return out


def expert_keeps(model: torch.nn.Module, specs: Iterable) -> dict[str, Kept]:
    """``{checkpoint name: (dim, start, length)}`` for the per-expert tensors of ``specs`` that
    this rank's MoE layers load part of, or none of (expert parallelism); see the module doc."""
    shapes = {spec.name: tuple(spec.shape) for spec in specs}
    out: dict[str, Kept] = {}
    for layer in moe_layers(model):
        out.update(_layer_expert_keeps(layer, shapes))
    return out


def expert_kept(
    shard_id: str, shape: tuple[int, ...], *, tp_size: int, tp_rank: int, per_rank: int, local: bool
) -> Kept | None:
    """What vLLM 0.32's ``RoutedExperts.weight_loader`` reads of one expert's unquantized weight
    of checkpoint ``shape`` (vLLM's ``shard_id``) on MoE TP rank ``tp_rank`` of ``tp_size``:
    nothing when the expert is not on this rank (``local``); None (whole) when it reads it all,
    or when its piece (``full // tp_size``) is not ``per_rank``, the size vLLM allocated per rank
    (its loader would then read a piece this mapping does not vouch for)."""
    dim = EXPERT_DIM.get(shard_id)
    if dim is None or len(shape) != 2 or not 0 <= tp_rank < tp_size:
        return None
    if not local:
        return 0, 0, 0
    full = shape[dim]
    piece = full // tp_size
    if tp_size == 1 or piece != per_rank or piece * tp_size != full:
        return None
    return dim, piece * tp_rank, piece


def _layer_expert_keeps(layer, shapes: dict[str, tuple[int, ...]]) -> dict[str, Kept]:
    """``expert_keeps`` of one ``RoutedExperts`` layer; nothing unless its experts load as
    ``expert_kept`` says (see the module doc)."""
    cfg = layer.moe_config
    per_rank = cfg.intermediate_size_per_partition_unpadded
    if not _plain_experts(layer) or getattr(layer, "intermediate_size_per_partition", None) != (
        per_rank
    ):
        return {}
    try:
        expected = expected_tensors(layer)
    except WorkersError:
        return {}
    experts: dict[str, tuple[str, list[int]]] = {}  # checkpoint name -> (shard id, expert ids)
    for _, weight_name, expert_id, shard_id in layer.get_expert_mapping():
        name = f"{layer.layer_name}.{weight_name.removeprefix('experts.')}weight"
        experts.setdefault(name, (shard_id, []))[1].append(expert_id)
    out = {}
    for name, (shard_id, ids) in experts.items():
        shape = shapes.get(name)
        if shape is None or shape != expected.get(name):
            continue
        # the loader's own test: a physical expert id this rank does not hold maps to -1
        local = any(layer._map_global_expert_id_to_local_expert_id(i) != -1 for i in ids)
        kept = expert_kept(
            shard_id, shape, tp_size=cfg.tp_size, tp_rank=cfg.tp_rank, per_rank=per_rank,
            local=local,
        )  # fmt: skip
        if kept is not None:
            out[name] = kept
    return out


def _plain_experts(layer) -> bool:
    """Unquantized experts loaded by the layer's own ``weight_loader`` as ``expert_kept`` says:
    ``RoutedExperts``' own loading steps (no subclass overriding them), no quantization, no
    transposed weights, no padded TP shards, no EPLB, no online-quantized shared expert."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    # a subclass narrowing its own way (an override of the loader or its steps): not declared
    if any(getattr(type(layer), m, None) is not getattr(RoutedExperts, m) for m in LOADER_STEPS):
        return False
    if getattr(layer, "quant_config", None) is not None or not isinstance(
        getattr(layer, "quant_method", None), UnquantizedFusedMoEMethod
    ):
        return False
    cfg = layer.moe_config
    if cfg.tp_shard_with_padding or getattr(cfg.moe_parallel_config, "enable_eplb", True):
        return False  # padded shards; experts that EPLB moves between ranks at run time
    if getattr(layer, "_fused_shared_expert_quantizer", None) is not None:
        return False
    for attr in ("w13_weight", "w2_weight"):
        param = getattr(layer, attr, None)
        if param is None or getattr(param, "is_transposed", False):
            return False
        if getattr(param, "weight_loader", None) != layer.weight_loader:
            return False
    return True


def _parameter_of(name: str, params: dict, fused_ok: set) -> tuple[str, object] | None:
    """(vLLM parameter name, shard id) that checkpoint tensor ``name`` loads into, or None."""
    if name in params:
        return name, None
    prefix, _, attr = name.rpartition(".")
    parent, _, leaf = prefix.rpartition(".")
    if leaf not in PACKED:
        return None
    fused, sid = PACKED[leaf]
    pname = f"{parent}.{fused}.{attr}" if parent else f"{fused}.{attr}"
    if fused not in fused_ok or pname not in params:
        return None
    return pname, sid


def _kept(pname, module, attr, param, sid, shape, tp) -> Kept | None:
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    if getattr(param, "is_sharded_weight", False) or getattr(param, "packed_dim", None) is not None:
        return None  # pre-sharded or packed (quantized) weights: not declared
    loader = getattr(param, "weight_loader", None)
    own = (getattr(module, "weight_loader", None), getattr(module, "weight_loader_v2", None))
    if loader is not None and loader not in own:
        return None  # a model's own loader (e.g. Mamba's conv1d): not the layer's narrowing
    if isinstance(module, VocabParallelEmbedding):
        if attr != "weight" or sid is not None or getattr(param, "output_dim", None) != 0:
            return None
        if getattr(module, "tp_size", tp.size) != tp.size or len(shape) < 1:
            return None
        idx = module.shard_indices  # what VocabParallelEmbedding.weight_loader narrows to
        start, length = (
            idx.org_vocab_start_index,
            idx.org_vocab_end_index - idx.org_vocab_start_index,
        )
        if shape[0] != module.org_vocab_size or (start, length) == (0, shape[0]):
            return None
        return 0, start, length
    if not isinstance(module, LinearBase) or not shape:
        return None
    try:
        layout = declared_layout(pname, module, attr, param, shape, tp)
    except WorkersError:
        return None
    if layout.dim is None:
        return None
    per_rank = {0: "output_size_per_partition", 1: "input_size_per_partition"}.get(layout.dim)
    if per_rank is None or layout.local_shape()[layout.dim] != getattr(module, per_rank, None):
        return None
    try:
        if layout.full_shape(sid) != shape:
            return None
        return layout.kept(sid)
    except KeyError:
        return None
