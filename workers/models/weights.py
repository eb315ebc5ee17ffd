"""Checkpoint names <-> (possibly fused) parameters, for any model built from `workers.layers`.

A model declares `packed_modules_mapping` (checkpoint module name -> (fused module name, shard
id)), e.g. {"q_proj": ("qkv_proj", "q"), "gate_proj": ("gate_up_proj", 0)}; every parameter
carries a `shard_layout`. A mixture-of-experts model also declares `expert_params_mapping`
(checkpoint-name suffix -> (parameter-name suffix, shard id), e.g. "experts.3.up_proj.weight" ->
("experts.gate_up_proj", (3, 1)); built by `layers.moe.expert_params_mapping`), so each expert's
checkpoint tensors are rows of fused parameters. From these alone this mixin provides:

- `load_weights(weights)`: any order, any subset; checks every (name, shape) of the call before
  writing a byte, then writes this rank's slices in place (`param.data` is never re-allocated,
  so CUDA graphs and IPC views stay valid); returns the checkpoint names written.
- `check_weights(metas, exact_dtype=False)`: the same checks on (name, dtype, shape) records,
  writing nothing; `exact_dtype` (weight updates) also refuses a floating dtype other than the
  parameter's, naming the tensor, instead of converting it.
- `checkpoint_names()`: every tensor a full checkpoint must provide.
- `checkpoint_tensors()`: (name, full tensor in checkpoint layout), unfused and gathered over the
  TP group, so the same weights give the same tensors whatever the TP size. Collective: every rank
  must iterate it to the end, in step.
- `process_weights_after_loading()`: the post-load hook, run once after a whole load or update
  (never per bucket): every submodule's `process_weights_after_loading` (FP8 layers rebuild their
  forward weight from the checkpoint-layout parameters), then the model's own
  `process_own_weights_after_loading`. Re-entrant and idempotent: it reads only parameters that
  loads write, writes only buffers allocated at build time, so memory stays flat over updates.

A parameter may restrict the checkpoint dtypes it accepts (`param.checkpoint_dtypes`, e.g. FP8
weights take float8_e4m3fn only). Others take any floating dtype and convert on copy when loading
from disk (a float32 checkpoint into a bf16 server, as `--dtype` asks), but exactly their own
dtype in a weight update (`exact_dtype`): an update is a copy of the model's weights, and a silent
cast there would hide a trainer sending the wrong precision.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from workers.distributed import TensorParallel
from workers.errors import WeightCheckError
from workers.layers.sharding import ShardId, ShardLayout, StackedLayout

# Names some checkpoints carry that hold no weight (precomputed rotary tables): accepted, skipped.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class CheckpointWeights:
    """Mixin for an `nn.Module` model with `tp: TensorParallel` and `packed_modules_mapping`."""

    packed_modules_mapping: dict[str, tuple[str, ShardId]] = {}
    expert_params_mapping: dict[str, tuple[str, ShardId]] = {}
    tp: TensorParallel
    # Checkpoint names accepted and skipped because another tensor carries them (a tied LM head).
    aliased_names: frozenset[str] = frozenset()

    def _params(self) -> dict[str, nn.Parameter]:
        # Parameters are never re-allocated (loads copy in place), so the table is built once.
        table = self.__dict__.get("_param_table")
        if table is None:
            table = self.__dict__["_param_table"] = dict(self.named_parameters())  # type: ignore[attr-defined]
        return table

    def _expert_tables(self) -> tuple[list[int], list[int], dict[tuple[str, Any], str]]:
        """(checkpoint-suffix lengths, parameter-suffix lengths, inverse of the expert mapping),
        in parts, built once."""
        tables = self.__dict__.get("_expert_tables_cache")
        if tables is None:
            mapping = self.expert_params_mapping
            ckpt_lens = sorted({k.count(".") + 1 for k in mapping})
            param_lens = sorted({v[0].count(".") + 1 for v in mapping.values()})
            inverse = {(fused, sid): ckpt for ckpt, (fused, sid) in mapping.items()}
            tables = self.__dict__["_expert_tables_cache"] = (ckpt_lens, param_lens, inverse)
        return tables

    def _resolve_expert(self, parts: list[str]) -> tuple[str, ShardId] | None:
        for n in self._expert_tables()[0]:
            entry = self.expert_params_mapping.get(".".join(parts[-n:]))
            if entry is not None and len(parts) > n:
                param_name = ".".join([*parts[:-n], entry[0]])
                if param_name in self._params():
                    return param_name, entry[1]
        return None

    def resolve(self, name: str) -> tuple[str, ShardId]:
        """Checkpoint name -> (parameter name, shard id); KeyError names an unknown one."""
        parts = name.split(".")
        if self.expert_params_mapping and (found := self._resolve_expert(parts)):
            return found
        for i, part in enumerate(parts):
            if part in self.packed_modules_mapping:
                fused, shard_id = self.packed_modules_mapping[part]
                param_name = ".".join([*parts[:i], fused, *parts[i + 1 :]])
                if param_name in self._params():
                    return param_name, shard_id
        if name in self._params():
            return name, None
        raise KeyError(name)

    def checkpoint_name(self, param_name: str, shard_id: ShardId) -> str:
        """(parameter name, shard id) -> checkpoint name: the inverse of `resolve`."""
        if shard_id is None:
            return param_name
        parts = param_name.split(".")
        if self.expert_params_mapping:
            _, param_lens, inverse = self._expert_tables()
            for n in param_lens:
                ckpt = inverse.get((".".join(parts[-n:]), shard_id))
                if ckpt is not None:
                    return ".".join([*parts[:-n], ckpt])
        for ckpt_module, (fused, sid) in self.packed_modules_mapping.items():
            if sid == shard_id and fused in parts:
                i = parts.index(fused)
                return ".".join([*parts[:i], ckpt_module, *parts[i + 1 :]])
        raise KeyError(f"{param_name} has no checkpoint name for shard {shard_id!r}")

    def checkpoint_names(self) -> list[str]:
        return [
            self.checkpoint_name(pname, sid)
            for pname, param in self._params().items()
            for sid in _layout(pname, param).shard_ids()
        ]

    def _skipped(self, name: str) -> bool:
        return name in self.aliased_names or name.endswith(IGNORED_SUFFIXES)

    def _problem(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], exact_dtype: bool
    ) -> str | None:
        try:
            pname, sid = self.resolve(name)
        except KeyError:
            return f"{name}: the model has no such tensor"
        param = self._params()[pname]
        expected = _layout(pname, param).full_shape(sid)
        if tuple(shape) != expected:
            return f"{name}: shape {tuple(shape)} does not fit the model's {expected}"
        accepted = getattr(param, "checkpoint_dtypes", None)
        if accepted is not None and dtype not in accepted:
            names = ", ".join(str(d).removeprefix("torch.") for d in accepted)
            return f"{name}: dtype {str(dtype).removeprefix('torch.')} is not {names}"
        if accepted is None and exact_dtype and dtype != param.dtype:
            return (
                f"{name}: dtype {str(dtype).removeprefix('torch.')} is not the model's "
                f"{str(param.dtype).removeprefix('torch.')} (an update is not converted)"
            )
        return None

    def check_weights(
        self, metas: Iterable[tuple[str, Any, Any]], *, exact_dtype: bool = False
    ) -> list[str]:
        """Problems with (name, dtype, shape) records: unknown names, shapes that do not fit,
        non-floating dtypes (with `exact_dtype`: any dtype but the parameter's), duplicates.
        Writes nothing; an empty list means all fit."""
        problems, seen = [], set()
        for name, dtype, shape in metas:
            if name in seen:
                problems.append(f"{name}: given twice")
            seen.add(name)
            dt = _dtype(dtype)
            if dt is None or not dt.is_floating_point:
                problems.append(f"{name}: dtype {dtype} is not a floating-point dtype")
            elif not self._skipped(name) and (p := self._problem(name, dt, shape, exact_dtype)):
                problems.append(p)
        return problems

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Write checkpoint tensors into this rank's parameters; see the module docstring."""
        items = [(name, t) for name, t in weights if not self._skipped(name)]
        problems = self.check_weights((name, t.dtype, t.shape) for name, t in items)
        if problems:
            raise WeightCheckError(problems)
        params = self._params()
        for name, tensor in items:
            pname, sid = self.resolve(name)
            param = params[pname]
            param.weight_loader(param, tensor, sid)
        return {name for name, _ in items}

    def checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for pname, param in self._params().items():
            layout = _layout(pname, param)
            data = param.data
            if data.dtype in _BYTE_FLOATS:  # not every collective backend carries float8
                data = data.view(torch.uint8)
            shards = [data] if layout.dim is None else self.tp.all_gather_list(data)
            for sid, full in layout.unshard(shards).items():
                yield self.checkpoint_name(pname, sid), full.view(param.dtype)

    @torch.no_grad()
    def process_weights_after_loading(self) -> None:
        """The post-load hook: once after the last tensor of a load or update; see the module
        docstring. Local to this rank (no collective)."""
        for module in self.modules():  # type: ignore[attr-defined]
            hook = getattr(module, "process_weights_after_loading", None)
            if module is not self and hook is not None:
                hook()
        self.process_own_weights_after_loading()

    def process_own_weights_after_loading(self) -> None:
        """The model's own post-load step, after every module's (default: nothing)."""


_BYTE_FLOATS = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)
)


def _layout(name: str, param: nn.Parameter) -> ShardLayout | StackedLayout:
    layout = getattr(param, "shard_layout", None)
    if layout is None:
        raise TypeError(f"parameter {name} was not built with workers.layers (no shard_layout)")
    return layout


def _dtype(dtype: Any) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype).removeprefix("torch."), None)
    return found if isinstance(found, torch.dtype) else None


def tensor_digest(tensor: torch.Tensor) -> dict[str, Any]:
    """{"dtype", "shape", "sha256"}: sha256 of the tensor's raw bytes (contiguous, on CPU)."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    digest = hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()
    return {
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "sha256": digest,
    }


def combined_digest(tensors: dict[str, dict[str, Any]]) -> str:
    """One sha256 over every tensor's (name, dtype, shape, sha256), in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        d = tensors[name]
        h.update(f"{name}\t{d['dtype']}\t{d['shape']}\t{d['sha256']}\n".encode())
    return h.hexdigest()
