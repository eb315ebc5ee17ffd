"""vLLM's fused MoE experts and the per-expert checkpoint tensors they are loaded from.

vLLM (0.32) holds the routed experts of an MoE layer (``RoutedExperts``) as two fused parameters,
``w13_weight`` [experts, 2 x inter / TP, hidden] (each expert's ``gate_proj`` then ``up_proj``,
vLLM's shards ``w1`` and ``w3``) and ``w2_weight`` [experts, hidden, inter / TP] (``down_proj``,
shard ``w2``), loaded from checkpoint tensors ``<layer>.<expert>.{gate,up,down}_proj.weight``
through the layer's own expert mapping (``RoutedExperts.get_expert_mapping``). Three things an
update needs that vLLM does not give:

- **Accounting** (``check_experts``, part of the dry run): vLLM's expert loader narrows whatever
  it is given to the slice it expects (a tensor of the wrong shape may load silently, truncated)
  and reports loaded names per fused parameter (an expert left out goes unnoticed). Every expert
  tensor the layer's mapping names must be in the update, with the full checkpoint shape
  (``SHARD_SHAPES``), and nothing else may be under the layer's prefix; errors name the tensor.
- **Repacking after a reload** (``repack_after_reload``): on CPU, vLLM's experts
  (``CPUUnquantizedExperts``) prepack ``w13_weight``/``w2_weight`` for their grouped GEMM in their
  own ``process_weights_after_loading``, which vLLM's MoE method calls on the first load only; on
  a weight update (layerwise reload) it skips it, and the kernel would compute with unpacked
  weights. While an update runs, each such layer's method is followed by the kernel's own step.
- **Checksums in checkpoint order** (``unpacked``): the CPU prepack is a permutation of elements;
  packing an index tensor finds it, and its inverse gives the fused experts in checkpoint order,
  so a worker's checksums of expert weights compare with a checkpoint's.
"""

from __future__ import annotations

import functools
from bisect import bisect_left
from typing import Any

import torch

from workers.errors import WorkersError

Manifest = list[tuple[str, torch.dtype, tuple[int, ...]]]

# vLLM's expert shard id -> the full checkpoint shape of one expert's tensor ("inter": the layer's
# intermediate size, "hidden": its hidden size), weight and bias.
SHARD_SHAPES = {
    "w1": (("inter", "hidden"), ("inter",)),  # gate_proj
    "w3": (("inter", "hidden"), ("inter",)),  # up_proj
    "w2": (("hidden", "inter"), ("hidden",)),  # down_proj
}


def _routed_experts_cls():
    try:
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    except ImportError:  # another vLLM: no fused experts known to this module
        return None
    return RoutedExperts


def moe_layers(model: torch.nn.Module) -> list[Any]:
    """The model's ``RoutedExperts`` layers."""
    cls = _routed_experts_cls()
    if cls is None:
        return []
    return [m for m in model.modules() if isinstance(m, cls)]


def expected_tensors(layer: Any) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> full shape of every expert tensor of ``layer`` (all logical experts,
    whichever this rank holds)."""
    cfg = layer.moe_config
    sizes = {
        "inter": cfg.intermediate_size_per_partition_unpadded * cfg.tp_size,
        "hidden": cfg.hidden_dim_unpadded,
    }
    out = {}
    for _, weight_name, _, shard_id in layer.get_expert_mapping():
        if shard_id not in SHARD_SHAPES or not weight_name.startswith("experts."):
            raise WorkersError(
                f"{layer.layer_name}: vLLM's expert mapping has {weight_name!r} (shard "
                f"{shard_id!r}), not declared in workers.vllm.experts.SHARD_SHAPES"
            )
        base = f"{layer.layer_name}.{weight_name.removeprefix('experts.')}"
        weight, bias = SHARD_SHAPES[shard_id]
        out[base + "weight"] = tuple(sizes[d] for d in weight)
        if cfg.has_bias:
            out[base + "bias"] = tuple(sizes[d] for d in bias)
    return out


def check_experts(model: torch.nn.Module, manifest: Manifest) -> list[str]:
    """Problems of ``manifest``'s expert tensors for ``model`` (``expert_problems``)."""
    want = {layer.layer_name: expected_tensors(layer) for layer in moe_layers(model)}
    return expert_problems(want, manifest)


def expert_problems(want: dict[str, dict[str, tuple[int, ...]]], manifest: Manifest) -> list[str]:
    """Problems of ``manifest``'s expert tensors, each naming a tensor; ``want``: layer name ->
    ``expected_tensors``. A layer none of whose per-expert tensors is in the manifest is left to
    vLLM's own check (a fused-experts checkpoint, or a layer the update does not carry: vLLM's
    accounting of fused parameters reports it)."""
    shapes = {name: tuple(shape) for name, _, shape in manifest}
    order = {name: i for i, name in enumerate(shapes)}
    ranked = sorted(shapes)  # the names under a prefix are one run of it: a bisect per layer
    problems = []
    for layer_name, expected in want.items():
        run = ranked[bisect_left(ranked, layer_name + ".") : bisect_left(ranked, layer_name + "/")]
        mine = sorted(run, key=order.__getitem__)  # problems in the update's order
        if not any(n in expected for n in mine):
            continue
        for name in mine:
            if name not in expected:
                problems.append(
                    f"{name}: not an expert tensor of this model ({len(expected)} expected)"
                )
            elif shapes[name] != expected[name]:
                problems.append(
                    f"{name}: shape {list(shapes[name])}, the model's experts take "
                    f"{list(expected[name])}"
                )
        missing = sorted(n for n in expected if n not in shapes)
        if missing:
            problems.append(f"{len(missing)} expert tensors not in the update, e.g. {missing[:5]}")
    return problems


def _cpu_experts(layer: Any):
    """``layer``'s CPU prepacking experts kernel, or None."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:
        return None
    kernel = getattr(layer.quant_method, "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    return experts if isinstance(experts, CPUUnquantizedExperts) else None


def repack_after_reload(model: torch.nn.Module):
    """Make every CPU MoE layer of ``model`` prepack its weights again when vLLM's reload
    processes it (see the module doc); returns the function that undoes it."""
    patched = []
    for layer in moe_layers(model):
        experts = _cpu_experts(layer)
        if experts is None:
            continue
        method = layer.quant_method
        # a patch left by an update whose undo never ran is replaced, not wrapped (wrapping it
        # would prepack twice: wrong weights)
        vars(method).pop("process_weights_after_loading", None)
        original = method.process_weights_after_loading

        def process_then_repack(layer, _original=original, _experts=experts) -> None:
            _original(layer)
            _experts.process_weights_after_loading(layer)

        object.__setattr__(method, "process_weights_after_loading", process_then_repack)
        patched.append(method)

    def undo() -> None:
        for method in patched:
            vars(method).pop("process_weights_after_loading", None)

    return undo


def _index_permutation(shape: tuple[int, ...], dtype: torch.dtype, isa: str) -> torch.Tensor:
    """Where the CPU prepack of a ``shape`` tensor puts each element: packed.flatten()[i] =
    tensor.flatten()[perm[i]]. Found by packing the flat index, one base-256 digit at a time
    (small integers are exact in every float dtype)."""
    from vllm import _custom_ops as ops

    index = torch.arange(int(torch.Size(shape).numel()), dtype=torch.int64)
    perm = torch.zeros_like(index)
    scale = 1
    while scale == 1 or scale <= index[-1]:
        digit = ((index // scale) % 256).to(dtype).view(shape)
        perm += ops.cpu_prepack_moe_weight(digit, isa).flatten().to(torch.int64) * scale
        scale *= 256
    return perm


@functools.cache
def _expert_permutation(shape: tuple[int, ...], dtype: torch.dtype, isa: str) -> torch.Tensor:
    """``_index_permutation`` of ``shape`` [experts, ...] as a [experts or 1, per expert] table:
    one row when the prepack permutes each expert alike within its own elements (vLLM 0.32:
    checked here on two experts), so the cache holds 8 bytes per element of one expert, not of
    the layer (gigabytes for a large MoE layer); else the whole permutation."""
    one = (1, *shape[1:])
    per = int(torch.Size(one).numel())
    row = _index_permutation(one, dtype, isa)
    if shape[0] == 1 or torch.equal(
        _index_permutation((2, *shape[1:]), dtype, isa), torch.cat([row, row + per])
    ):
        return row.view(1, per)
    return _index_permutation(shape, dtype, isa).view(1, -1)


def _unpermuted(packed: torch.Tensor, isa: str) -> torch.Tensor:
    """``packed`` (a CPU-prepacked [experts, ...] parameter) with the prepack's permutation
    undone, on the CPU."""
    perm = _expert_permutation(tuple(packed.shape), packed.dtype, isa)
    rows = torch.empty(packed.numel() // perm.shape[1], perm.shape[1], dtype=packed.dtype)
    rows[:, perm[0]] = packed.detach().cpu().reshape(rows.shape)
    return rows.view(packed.shape)


@torch.no_grad()
def unpacked(layer: torch.nn.Module, name: str, param: torch.Tensor) -> torch.Tensor | None:
    """A CPU-prepacked expert parameter (``w13_weight`` / ``w2_weight``) in checkpoint order,
    intermediate padding removed; None for anything else."""
    cls = _routed_experts_cls()
    if name not in ("w13_weight", "w2_weight") or cls is None or not isinstance(layer, cls):
        return None
    experts = _cpu_experts(layer)
    if experts is None or getattr(experts, "_use_zentorch", False):
        return None
    shape = tuple(param.shape)
    full = _unpermuted(param, experts.isa)
    inter = layer.moe_config.intermediate_size_per_partition_unpadded
    if name == "w2_weight":
        return full[:, :, :inter].contiguous()
    padded = shape[1] // 2
    return torch.cat([full[:, :inter], full[:, padded : padded + inter]], dim=1)
