"""Model registry: config.json's architecture -> model class, and `build_model`."""

from __future__ import annotations

import torch

from workers.distributed import TensorParallel
from workers.errors import ConfigError
from workers.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from workers.models.decoder import DenseDecoderForCausalLM, MoeDecoderForCausalLM

MODELS: dict[str, type[DenseDecoderForCausalLM]] = {
    "LlamaForCausalLM": DenseDecoderForCausalLM,
    "Qwen3ForCausalLM": DenseDecoderForCausalLM,
    "Qwen3MoeForCausalLM": MoeDecoderForCausalLM,
}
assert set(MODELS) == set(SUPPORTED_ARCHITECTURES)


def build_model(
    config: ModelConfig, *, tp: TensorParallel, dtype: torch.dtype, device: torch.device
) -> DenseDecoderForCausalLM:
    """The model with uninitialised parameters of `dtype` on `device` (weights come later)."""
    try:
        cls = MODELS[config.architecture]
    except KeyError:
        raise ConfigError(
            f"no model for {config.architecture}; supported: {', '.join(MODELS)}"
        ) from None
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config, tp)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def resolve_dtype(name: str, config: ModelConfig) -> torch.dtype:
    """`--dtype`: auto = the checkpoint's own dtype (float32 when config.json names none)."""
    if name == "auto":
        name = config.dtype or "float32"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"unsupported dtype {name!r}")
    return dtype


__all__ = [
    "MODELS",
    "DenseDecoderForCausalLM",
    "ModelConfig",
    "MoeDecoderForCausalLM",
    "build_model",
    "resolve_dtype",
]
