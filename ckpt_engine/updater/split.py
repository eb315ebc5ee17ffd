"""The split: which rank registers what (pure, the same on every rank), and registering a share.

The checkpoint's safetensors files (through model.safetensors.index.json when present) are shared
across ranks balanced by bytes, deterministically (largest first, ties by name, onto the
least-loaded rank): whole files when there are at least as many files as ranks and that split is
within 10% of the tensor-level one, else single tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ckpt_engine import ParameterServer, json_depth
from ckpt_engine.safetensors_io import read_header

FILE_SPLIT_SLACK = 1.10  # whole files when their split is at most 10% worse than per-tensor


@dataclass(frozen=True)
class Share:
    """What one rank registers: whole files, or single tensors as (file, name)."""

    files: tuple[str, ...] = ()
    tensors: tuple[tuple[str, str], ...] = ()
    nbytes: int = 0


def greedy_split(items: list[tuple[str, int]], world: int) -> list[tuple[list[str], int]]:
    """Largest first (ties by key) onto the least-loaded rank (ties: the lowest rank)."""
    out: list[tuple[list[str], int]] = [([], 0) for _ in range(world)]
    for key, nbytes in sorted(items, key=lambda kv: (-kv[1], kv[0])):
        rank = min(range(world), key=lambda r: (out[r][1], r))
        out[rank] = (out[rank][0] + [key], out[rank][1] + nbytes)
    return out


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json_depth.loads(index.read_text(), what=str(index))["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def split_checkpoint(path: str | Path, world: int) -> tuple[str, list[Share]]:
    """("files" | "tensors", one Share per rank), balanced by bytes; see the module docstring."""
    tensors: dict[str, tuple[str, int]] = {}
    sizes: list[tuple[str, int]] = []
    for file in checkpoint_files(Path(path)):
        header = read_header(str(file))
        sizes.append((str(file), sum(t.nbytes for t in header.tensors)))
        for t in header.tensors:
            if t.name in tensors:
                raise ValueError(f"tensor {t.name} is in both {tensors[t.name][0]} and {file}")
            tensors[t.name] = (str(file), t.nbytes)
    by_tensor = greedy_split([(n, b) for n, (_, b) in tensors.items()], world)
    if len(sizes) >= world:
        by_file = greedy_split(sizes, world)
        if max(b for _, b in by_file) <= FILE_SPLIT_SLACK * max(b for _, b in by_tensor):
            return "files", [Share(files=tuple(sorted(fs)), nbytes=b) for fs, b in by_file]
    shares = [
        Share(tensors=tuple(sorted((tensors[n][0], n) for n in names)), nbytes=b)
        for names, b in by_tensor
    ]
    return "tensors", shares


def share_inputs(share: Share) -> tuple[list[str], dict[str, torch.Tensor]]:
    """A share as ``register_checkpoint``'s ``files`` and ``named_tensors`` (single tensors
    read here)."""
    named: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for file, tensor in share.tensors:
        by_file.setdefault(file, []).append(tensor)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            named.update((n, f.get_tensor(n)) for n in names)
    return list(share.files), named


def register_share(ps: ParameterServer, name: str, share: Share) -> None:
    files, named = share_inputs(share)
    ps.register_checkpoint(name, files=files, named_tensors=named)
