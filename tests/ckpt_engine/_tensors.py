"""Deterministic test tensors: every supported dtype and awkward shapes, per rank.

The parameter-server rank and the worker both rebuild them from (seed, rank), so a worker can
check every byte it receives without the data ever being sent to it another way.
"""

from __future__ import annotations

import hashlib

import torch

from ckpt_engine import dtypes


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def random_tensor(seed: int, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random bits of ``dtype`` (any bit pattern, NaNs included; bool is 0/1)."""
    gen = _generator(seed, name)
    numel = 1
    for d in shape:
        numel *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return raw.view(dtype).reshape(shape)


def rank_tensors(seed: int, rank: int, *, big_bytes: int, tiny: int) -> tuple[dict, dict, dict]:
    """(file_a, file_b, named): three disjoint dicts of tensors held by ``rank``."""
    p = f"r{rank}."
    file_a: dict[str, torch.Tensor] = {}
    file_b: dict[str, torch.Tensor] = {}
    named: dict[str, torch.Tensor] = {}
    for i, name in enumerate(dtypes.SUPPORTED):
        dtype = dtypes.to_torch(name)
        target = (file_a, named)[i % 2]
        target[f"{p}dtype.{name}"] = random_tensor(seed, f"{p}dtype.{name}", dtype, (3, 5))
        other = (named, file_b)[i % 2]
        other[f"{p}odd.{name}"] = random_tensor(seed, f"{p}odd.{name}", dtype, (7,))
    awkward = {
        f"{p}scalar": (torch.float32, ()),
        f"{p}one": (torch.float16, (1,)),
        f"{p}empty": (torch.bfloat16, (0, 4)),
        f"{p}flag": (torch.bool, (3,)),
        f"{p}after_flag": (torch.float32, (2, 1, 3)),
        f"{p}big": (torch.bfloat16, (big_bytes // 2,)),
    }
    for i, (name, (dtype, shape)) in enumerate(awkward.items()):
        (file_b, named)[i % 2][name] = random_tensor(seed, name, dtype, shape)
    file_a[f"{p}big_file"] = random_tensor(
        seed, f"{p}big_file", torch.float32, (big_bytes // 4 + 3,)
    )
    for i in range(tiny):
        name = f"{p}tiny.{i}"
        (file_a, named)[i % 2][name] = random_tensor(seed, name, torch.int8, (i % 3 + 1,))
    return file_a, file_b, named


def all_expected(
    seed: int, world_size: int, *, big_bytes: int, tiny: int
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for rank in range(world_size):
        for part in rank_tensors(seed, rank, big_bytes=big_bytes, tiny=tiny):
            out.update(part)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.numel() == 0:
        return True
    a = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    b = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(a, b)
