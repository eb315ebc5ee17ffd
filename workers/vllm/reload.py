"""One weight update into one live vLLM model, through vLLM's layerwise reload.

vLLM's layers may change their weights after the first load (``process_weights_after_loading``:
on CPU the unquantized linear layers repack their weight for oneDNN and leave ``layer.weight``
empty; quantized methods on GPU repack too), so ``model.load_weights`` on a served model has
nowhere to write. vLLM (0.32) loads into a served model with its layerwise reload
(``vllm.model_executor.model_loader.reload``): ``initialize_layerwise_reload(model)`` puts every
layer back into checkpoint format on the meta device and wraps the weight loaders so that each
layer buffers what it is given; once a layer has all its elements, it is materialized, loaded,
post-processed (``process_weights_after_loading`` of that layer) and copied into the layer's
original storage; ``finalize_layerwise_reload(model, model_config)`` does the rest (attention
layers, layers that were not complete).

``ModelReload`` drives that sequence for one update and adds what an update from a parameter
server needs:

- ``check(manifest)``: a dry run before anything is written and before the reload starts. The
  model's layers are swapped for meta tensors in checkpoint format (vLLM's recorded metadata),
  ``model.load_weights`` runs on meta tensors of the manifest's shapes (vLLM's own loaders check
  names and shapes, nothing is copied), and every model parameter must be covered; then the
  model's own tensors are put back. A refused update leaves the model exactly as it was.
- ``load(weights)``: the reload starts at the first bucket (so a refused or failed handshake never
  leaves meta tensors behind). vLLM keeps the tensors it is given until their layer is complete,
  possibly across buckets, and ckpt-engine's views point into an IPC slot that is reused for the
  next bucket: each tensor is copied before vLLM sees it (the copy lives until vLLM drops it).
- ``finish()``: ``finalize_layerwise_reload`` once, after the last bucket.
- MoE (``workers.vllm.experts``): the dry run accounts for every expert tensor (name and full
  shape), and while the reload runs, vLLM's CPU experts prepack their weights again.
- ``abandon()``: after a failure once the reload has started, every layer still waiting for
  weights gets its own tensors back (vLLM's ``restore`` data: the weights from before this
  update), so the model is servable again (no meta tensors): layers completed before the failure
  hold the new weights, the others the previous ones.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from workers.errors import WeightCheckError
from workers.vllm.experts import check_experts, repack_after_reload, unpacked

logger = logging.getLogger(__name__)

Manifest = list[tuple[str, torch.dtype, tuple[int, ...]]]
Weights = list[tuple[str, torch.Tensor]]


def _layer_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        **{n: p for n, p in layer._parameters.items() if p is not None},
        **{n: b for n, b in layer._buffers.items() if b is not None},
    }


class _Swap:
    """The tensors of every layer of a model, taken out and put back as they were."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.saved = [
            (
                layer,
                dict(layer._parameters),
                dict(layer._buffers),
                set(layer._non_persistent_buffers_set),
                # tensors kept as plain attributes (some kernels' layout): vLLM's restore
                # deletes them when they bear a recorded parameter's name
                {k: v for k, v in vars(layer).items() if isinstance(v, torch.Tensor)},
            )
            for layer in model.modules()
        ]

    def put_back(self) -> None:
        for layer, params, buffers, non_persistent, plain in self.saved:
            layer._parameters.clear()
            layer._parameters.update(params)
            layer._buffers.clear()
            layer._buffers.update(buffers)
            layer._non_persistent_buffers_set.clear()
            layer._non_persistent_buffers_set.update(non_persistent)
            for name, tensor in plain.items():
                if name not in vars(layer):
                    object.__setattr__(layer, name, tensor)


@torch.no_grad()
def check_manifest(model: torch.nn.Module, manifest: Manifest, *, complete: bool = True) -> None:
    """Raise WeightCheckError unless ``manifest`` loads into ``model`` (see the module doc);
    ``complete``: every model parameter must be loaded (vLLM's own loader checks this for
    unquantized models only: quantized ones may hold parameters no checkpoint carries); for
    unquantized models, MoE expert tensors are accounted for one by one first
    (``workers.vllm.experts.check_experts``: vLLM's expert loader does not)."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import (
        restore_layer_on_meta,
        to_meta_tensor,
    )

    if complete:
        problems = check_experts(model, manifest)
        if problems:
            raise WeightCheckError(problems)
    swap = _Swap(model)
    try:
        for layer, *_ in swap.saved:
            restore_layer_on_meta(layer, get_layerwise_info(layer))
            for name, tensor in _layer_tensors(layer).items():
                # a copy (vLLM's restore keeps e.g. bias as it is, and its recorded meta tensors
                # keep the loader wrappers of the last reload), with vLLM's own loader
                stand_in = to_meta_tensor(tensor)
                loader = getattr(stand_in, "weight_loader", None)
                while getattr(loader, "__name__", "") == "online_process_loader":
                    loader = loader.__wrapped__
                if loader is not None:
                    stand_in.weight_loader = loader
                table = layer._parameters if name in layer._parameters else layer._buffers
                table[name] = stand_in
        expected = {name for name, _ in model.named_parameters()}
        metas = [
            (n, torch.empty(shape, dtype=dtype, device="meta")) for n, dtype, shape in manifest
        ]
        try:
            loaded = model.load_weights(weights=metas)
        except Exception as e:  # vLLM's loaders: KeyError / ValueError / AssertionError
            raise WeightCheckError(_name_problems(model, manifest) or [_text(e)]) from e
    finally:
        swap.put_back()
    if complete and loaded is not None:
        missing = sorted(expected - set(loaded))
        if missing:
            raise WeightCheckError(
                [f"{len(missing)} model parameters not in the update, e.g. {missing[:5]}"]
            )


def _text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def _name_problems(model: torch.nn.Module, manifest: Manifest) -> list[str]:
    """The failure path of the dry run: each tensor alone, so that the error names it."""
    problems = []
    for name, dtype, shape in manifest:
        try:
            model.load_weights(weights=[(name, torch.empty(shape, dtype=dtype, device="meta"))])
        except Exception as e:
            problems.append(f"{name} {str(dtype).removeprefix('torch.')}{list(shape)}: {_text(e)}")
    return problems


class ModelReload:
    """One update into one vLLM model (see the module doc)."""

    def __init__(self, model: torch.nn.Module, model_config: Any) -> None:
        self.model = model
        self.model_config = model_config
        self.started = False
        self._undo_repack = None

    def check(self, manifest: Manifest) -> None:
        quantized = getattr(self.model_config, "quantization", None) is not None
        check_manifest(self.model, manifest, complete=not quantized)

    def load(self, weights: Weights) -> None:
        if not self.started:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            self.started = True
            self._undo_repack = repack_after_reload(self.model)
            initialize_layerwise_reload(self.model)
        # copies: vLLM may keep them past this call (until their layer is complete)
        self.model.load_weights(weights=[(name, t.clone()) for name, t in weights])

    def finish(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if not self.started:  # an update with no bucket loads nothing: nothing to finalize
            return
        finalize_layerwise_reload(self.model, self.model_config)
        self.started = False
        self._end_repack()

    def _end_repack(self) -> None:
        if self._undo_repack is not None:
            self._undo_repack()
            self._undo_repack = None

    @torch.no_grad()
    def abandon(self) -> None:
        """Make the model servable again after a failure (see the module doc)."""
        if not self.started:
            return
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        model = self.model
        if hasattr(model, "_original_do_torchao_reload"):
            model._do_torchao_reload = model._original_do_torchao_reload
        pending = 0
        for layer in model.modules():
            info = get_layerwise_info(layer)
            if not info.can_load():
                continue
            if info.kernel_tensors is not None:
                pending += 1
                for name in _layer_tensors(layer):
                    delattr(layer, name)
                params, buffers = info.kernel_tensors
                for name, param in params.items():
                    layer.register_parameter(name, param)
                for name, buffer in buffers.items():
                    persistent = name not in info.kernel_non_persistent_buffers
                    layer.register_buffer(name, buffer, persistent=persistent)
            info.reset()
        self.started = False
        self._end_repack()
        logger.warning(
            "weight update abandoned: %d layers kept their previous weights, the others hold "
            "the new ones",
            pending,
        )


@torch.no_grad()
def effective_weight(layer: torch.nn.Module, name: str, param: torch.Tensor) -> torch.Tensor:
    """``layer``'s parameter ``name`` as the layer computes with it, on its device: a repacked
    linear weight (``layer.weight`` empty) is recovered as its output for the identity matrix
    (``quant_method.apply(layer, I) = W^T``; exact for unquantized weights), anything else is
    the parameter itself (detached, no copy); CPU-prepacked MoE experts are unpacked into
    checkpoint order (``workers.vllm.experts.unpacked``, a copy)."""
    experts = unpacked(layer, name, param)
    if experts is not None:
        return experts
    quant = getattr(layer, "quant_method", None)
    if name == "weight" and param.numel() == 0 and hasattr(quant, "apply"):
        size = getattr(layer, "input_size_per_partition", None)
        if size is None:  # ReplicatedLinear (e.g. an MoE router's GateLinear): not sharded
            size = layer.input_size
        eye = torch.eye(size, dtype=param.dtype, device=param.device)
        return quant.apply(layer, eye).t().contiguous()
    return param.detach()


@torch.no_grad()
def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as the model computes with it (``effective_weight``), on CPU."""
    out: dict[str, torch.Tensor] = {}
    for prefix, layer in model.named_modules():
        for name, param in layer.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            out[full] = effective_weight(layer, name, param).cpu()
    return out
