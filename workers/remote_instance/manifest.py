"""`Manifest`: what a seed and a forking client must agree on before any byte moves.

One frozen record per side, built locally and without collectives (`build_manifest`): the model
config (flattened to `name=value` entries, so a difference names the field), every checkpoint
tensor (name, dtype, shape, in checkpoint layout: the view `checkpoint_tensors` gives, the same
whatever the TP size), the buffers (derived state: rotary tables, FP8 forward weights), the TP
size, the per-rank parameter layout of that TP size, and the weight version (filled in by the
seed's front). `Manifest.mismatches(client)` lists every difference, so a refusal names them.

The TP size and the weight version are not mismatches: a client of another TP size forks in
"full" mode, and the client adopts the seed's version. With equal TP sizes the per-rank layouts
must match too (the "shard" mode copies parameters verbatim); buffers are compared by name and
dtype always, by shape only with equal TP sizes (a TP-local buffer changes shape with TP), when
both manifests list buffers: a vLLM manifest (`workers.vllm.checkpoint_view`) lists none, as
vLLM rebuilds its derived state itself.

A reference seed's manifest also lists its parameters' shard layouts (rank 0's; not compared):
with them a client of another TP size asks for only the rows it keeps (`slices`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.errors import ProtocolError
from workers.remote_instance.slices import layouts_of

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        itemsize = getattr(torch, self.dtype).itemsize
        return itemsize * int(torch.Size(self.shape).numel())

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass(frozen=True, kw_only=True)
class Manifest:
    config: tuple[tuple[str, str], ...]  # flattened ModelConfig: (field, JSON value), sorted
    tensors: tuple[TensorSpec, ...]  # checkpoint layout, in the seed's send order ("full" mode)
    parameters: tuple[
        TensorSpec, ...
    ]  # one rank's parameters at `tp_size`, in send order ("shard")
    buffers: tuple[TensorSpec, ...]
    tp_size: int
    weight_version: str | None = None
    format: int = MANIFEST_FORMAT
    # {parameter: shard layout JSON, rank 0's}: a reference seed's, so a client of another TP
    # size can ask for only its rows (`slices`); None where the seed does not offer that.
    layouts: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def total_bytes(self) -> int:
        """Bytes of one full copy of the weights (checkpoint layout)."""
        return sum(t.nbytes for t in self.tensors)

    def mismatches(self, client: Manifest) -> list[str]:
        """Every difference that forbids `client` from forking from this (seed) manifest."""
        if self.format != client.format:
            return [f"manifest format: seed {self.format}, client {client.format}"]
        problems = _diff("config", dict(self.config), dict(client.config), str)
        problems += _diff_specs("tensor", self.tensors, client.tensors, shapes=True)
        same_tp = self.tp_size == client.tp_size
        if self.buffers and client.buffers:  # a vLLM manifest lists none (module doc)
            problems += _diff_specs("buffer", self.buffers, client.buffers, shapes=same_tp)
        if same_tp:
            problems += _diff_specs("parameter", self.parameters, client.parameters, shapes=True)
        return problems

    def to_json(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["config"] = dict(self.config)
        return raw

    @classmethod
    def from_json(cls, raw: Any) -> Manifest:
        try:
            specs = {
                key: tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in raw[key])
                for key in ("tensors", "parameters", "buffers")
            }
            return cls(
                config=tuple(sorted((str(k), str(v)) for k, v in raw["config"].items())),
                tp_size=int(raw["tp_size"]),
                weight_version=raw.get("weight_version"),
                format=int(raw["format"]),
                layouts=_layouts(raw.get("layouts")),
                **specs,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProtocolError(f"malformed manifest: {e!r}") from e


def build_manifest(model, *, weight_version: str | None = None, layouts: bool = False) -> Manifest:
    """This rank's view of `model` (a `CheckpointWeights` model with `config` and `tp`); local,
    no collective: checkpoint shapes come from the parameters' `shard_layout`. `layouts`: list
    them (a seed that serves slice mode)."""
    tensors = []
    params = dict(model.named_parameters())
    for pname, param in params.items():
        layout = param.shard_layout
        for sid in layout.shard_ids():
            name = model.checkpoint_name(pname, sid)
            tensors.append(TensorSpec(name, _dtype(param.dtype), layout.full_shape(sid)))
    return Manifest(
        config=tuple(sorted(_flatten(dataclasses.asdict(model.config)))),
        tensors=tuple(tensors),
        parameters=tuple(_spec(n, p) for n, p in params.items()),
        buffers=tuple(_spec(n, b) for n, b in model.named_buffers()),
        tp_size=model.tp.size,
        weight_version=weight_version,
        layouts=layouts_of(params.items()) if layouts else None,
    )


def _layouts(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError(f"layouts: expected an object, got {type(raw).__name__}")
    return raw


def _spec(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, _dtype(t.dtype), tuple(t.shape))


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _flatten(raw: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for key, value in raw.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", json.dumps(value)))
    return out


def _diff(kind: str, seed: dict, client: dict, show) -> list[str]:
    out = [f"{kind} {k}: only on the seed" for k in seed if k not in client]
    out += [f"{kind} {k}: only on the client" for k in client if k not in seed]
    out += [
        f"{kind} {k}: seed {show(seed[k])}, client {show(client[k])}"
        for k in seed
        if k in client and seed[k] != client[k]
    ]
    return out


def _diff_specs(kind: str, seed, client, *, shapes: bool) -> list[str]:
    def key(t: TensorSpec) -> str:
        return t.describe() if shapes else t.dtype

    return _diff(kind, {t.name: key(t) for t in seed}, {t.name: key(t) for t in client}, str)
