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
Everything else (norms, MoE experts, any layer not declared, a model with a drafter, TP=1) is
left out: read whole, which is always correct.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from workers.errors import WorkersError
from workers.vllm.checkpoint_view import FUSED, PACKED, VllmTP, declared_layout

Kept = tuple[int, int, int]


def model_keeps(model: torch.nn.Module, specs: Iterable) -> dict[str, Kept]:
    """``{checkpoint name: (dim, start, length)}`` for the tensors of ``specs`` (``TensorSpec``:
    name, shape) that this rank of ``model`` loads only part of; see the module doc."""
    tp = VllmTP()
    if tp.size == 1:
        return {}
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    fused_ok = {
        fused
        for fused, parts in getattr(model, "packed_modules_mapping", {}).items()
        if [c for c, _ in FUSED.get(fused, ())] == list(parts)
    }
    out = {}
    for spec in specs:
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
