"""Safetensors dtype names <-> torch dtypes (pure).

The safetensors name (``"BF16"``, ``"F8_E4M3"``, ...) is the canonical dtype spelling in our
metadata files and wire messages; it is what the file format stores. Packed sub-byte formats
(F4, F6_*) are not supported: their shapes do not count bytes.
"""

from __future__ import annotations

import torch

_CANDIDATES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}

# Only the dtypes this torch build knows.
_TO_TORCH: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _CANDIDATES.items() if hasattr(torch, attr)
}
_FROM_TORCH: dict[torch.dtype, str] = {dtype: name for name, dtype in _TO_TORCH.items()}

SUPPORTED: tuple[str, ...] = tuple(_TO_TORCH)


def is_supported(name: str) -> bool:
    return name in _TO_TORCH


def to_torch(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name; ValueError lists the supported ones."""
    try:
        return _TO_TORCH[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}; supported: {', '.join(SUPPORTED)}") from None


def from_torch(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; ValueError for dtypes safetensors cannot store."""
    try:
        return _FROM_TORCH[dtype]
    except KeyError:
        raise ValueError(
            f"dtype {dtype} cannot be stored; supported: {', '.join(map(str, _FROM_TORCH))}"
        ) from None


def is_storable(dtype: torch.dtype) -> bool:
    """Whether safetensors can store ``dtype`` (``from_torch`` would succeed)."""
    return dtype in _FROM_TORCH


def itemsize(name: str) -> int:
    return to_torch(name).itemsize


def nbytes_of(name: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of a dense tensor of this dtype and shape."""
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * itemsize(name)
