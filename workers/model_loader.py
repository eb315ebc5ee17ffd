"""Load formats: how a freshly built model gets its first weights (`--load-format`).

A registry of small classes with one template: `load(model, model_path)` streams (name, tensor)
pairs into `model.load_weights` and accounts for every checkpoint name (`WeightAccounting`):
a duplicate is an error at once, and a load that ends with parameters never written is an error
listing them. `dummy` writes random values into the same (already allocated) parameters, so it
takes the memory of the real weights; the server never reports random weights as healthy (it
refuses /generate until real weights arrive through an update).

Every format ends a successful load with `model.process_weights_after_loading()` (once, after
the last tensor: FP8 layers rebuild their forward weights there); so does every update path.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open

from ckpt_engine import json_depth
from workers.errors import (
    ConfigError,
    DuplicateWeightError,
    MissingWeightsError,
    WeightCheckError,
    WeightLoadError,
)


class WeightAccounting:
    """Which of a model's checkpoint names one load (or one update) has written."""

    def __init__(self, expected: Iterable[str], source: str) -> None:
        self.expected = frozenset(expected)
        self.source = source
        self.seen: set[str] = set()

    def add(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self.seen:
                raise DuplicateWeightError(f"{self.source}: tensor {name} given twice")
            self.seen.add(name)

    def missing(self) -> list[str]:
        return sorted(self.expected - self.seen)

    def finish(self) -> None:
        if missing := self.missing():
            raise MissingWeightsError(missing, self.source)


class LoadFormat(ABC):
    """Template: `precheck` everything it can before writing, then stream tensors into the model
    (`write`, default `model.load_weights`) with accounting; `finish` as the post-condition."""

    name: ClassVar[str]

    def load(self, model, model_path: str | Path, *, write=None) -> None:
        """Write every parameter of `model` (in place) or raise `WeightLoadError`."""
        path = Path(model_path)
        source = f"checkpoint {path}"
        self.precheck(model, path, source)
        write = model.load_weights if write is None else write
        accounting = WeightAccounting(model.checkpoint_names(), source)
        for name, tensor in self.weights(path):
            accounting.add(write([(name, tensor)]))
        accounting.finish()
        model.process_weights_after_loading()

    def precheck(self, model, path: Path, source: str) -> None:  # noqa: B027 (optional hook)
        """Raise before any write when the source cannot fit the model (default: no check)."""

    @abstractmethod
    def weights(self, path: Path) -> Iterator[tuple[str, torch.Tensor]]: ...


class SafetensorsFormat(LoadFormat):
    """`auto`: the *.safetensors files of a Hugging Face folder (through the index when present).
    Names, dtypes and shapes are checked from the file headers before any tensor is read."""

    name = "auto"

    def precheck(self, model, path: Path, source: str) -> None:
        metas = list(safetensors_metas(path))
        if problems := model.check_weights(metas):
            raise WeightCheckError([f"{source}: {p}" for p in problems])
        if missing := sorted(set(model.checkpoint_names()) - {name for name, _, _ in metas}):
            raise MissingWeightsError(missing, source)

    def weights(self, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
        for file in safetensors_files(path):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name)


class DummyFormat(LoadFormat):
    """`dummy`: random values (uniform in +-1e-3, seeded) in every parameter, same memory; FP8
    weights get uniform +-1 (times their +-1e-3 block scales)."""

    name = "dummy"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def load(self, model, model_path: str | Path, *, write=None) -> None:
        with torch.no_grad():
            for i, param in enumerate(model.parameters()):
                gen = torch.Generator(device=param.device).manual_seed(self.seed + i)
                if param.dtype.itemsize == 1:  # float8: no uniform_, fill through float32
                    values = torch.empty(param.shape, dtype=torch.float32, device=param.device)
                    param.data.copy_(values.uniform_(-1.0, 1.0, generator=gen))
                else:
                    param.data.uniform_(-1e-3, 1e-3, generator=gen)
        model.process_weights_after_loading()

    def weights(self, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError("dummy weights are written by load() directly")


LOAD_FORMATS: dict[str, type[LoadFormat] | str] = {
    SafetensorsFormat.name: SafetensorsFormat,
    DummyFormat.name: DummyFormat,
    # "module:class", imported on first use (it brings HTTP and transfer code along)
    "remote_instance": "workers.remote_instance.loader:RemoteInstanceFormat",
}


def get_load_format(name: str, *, seed: int = 0, args=None) -> LoadFormat:
    """The load format `name`; one configured by server flags (`from_server_args`: the
    remote-instance fork) needs the server's `args`."""
    if name not in LOAD_FORMATS:
        raise ConfigError(f"unknown load format {name!r}; supported: {', '.join(LOAD_FORMATS)}")
    cls = LOAD_FORMATS[name]
    if isinstance(cls, str):
        module, _, attr = cls.partition(":")
        cls = getattr(importlib.import_module(module), attr)
    if hasattr(cls, "from_server_args"):
        if args is None:
            raise ConfigError(f"load format {name!r} needs the server's settings")
        return cls.from_server_args(args)
    return cls(seed=seed) if cls is DummyFormat else cls()


def safetensors_files(model_path: Path) -> list[Path]:
    """The checkpoint's files: those the index names, else every *.safetensors, sorted."""
    index = model_path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json_depth.loads(index.read_text(), what=index.name)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightLoadError(f"cannot read {index}: {e!r}") from e
        files = [model_path / name for name in sorted(set(weight_map.values()))]
        if absent := [str(f) for f in files if not f.exists()]:
            raise WeightLoadError(f"{index} names files that do not exist: {', '.join(absent)}")
        return files
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {model_path}")
    return files


# safetensors header dtype names of the floating dtypes a checkpoint may hold
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def safetensors_metas(model_path: Path) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor, from the headers only (no tensor data is read)."""
    for file in safetensors_files(model_path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118
                sl = f.get_slice(name)
                dtype = sl.get_dtype()
                yield name, _SAFETENSORS_DTYPES.get(dtype, dtype), tuple(sl.get_shape())
