"""A block-FP8 quantizer for the tests (pure torch): a bf16 transformers model -> a Hugging Face
FP8 checkpoint in the format of DeepSeek-V3 / Qwen3-FP8 (config.json with `quantization_config`,
linear weights in float8_e4m3fn with a `*.weight_scale_inv` per 128x128 block, everything else in
bf16). The scales go to a second safetensors file (with an index), so a weight and its scale are
never read together."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from workers_testutil import make_hf_model

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
BLOCK = (128, 128)
# the `quantization_config` of a block-FP8 checkpoint (DeepSeek-V3 / Qwen3-FP8)
FP8_CONFIG = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
QUANTIZED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Sizes whose TP=2 shards fall on 128-row/column blocks: q 512 rows (256 per rank), k/v 256 rows
# (128 per rank), o_proj / down_proj inputs 512 (256 per rank), gate/up 512 rows each.
FP8_TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=128,
    vocab_size=256,
)


def quantize_block_fp8(
    w: torch.Tensor, block: tuple[int, int] = BLOCK, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, scale_inv [ceil(out/bo), ceil(in/bi)]): per block,
    scale_inv = amax / 448 and weight = round(w / scale_inv)."""
    rows, cols = w.shape
    bo, bi = block
    nr, nc = -(-rows // bo), -(-cols // bi)
    padded = torch.zeros(nr * bo, nc * bi)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(nr, bo, nc, bi)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12).to(scale_dtype)
    q = (blocks / scale.float()[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.to(torch.float8_e4m3fn).view(nr * bo, nc * bi)[:rows, :cols].contiguous()
    return q, scale


def bf16_model(family: str = "qwen3", *, seed: int = 0, **overrides):
    """The bf16 original: a random tiny model whose parameters are rounded to bf16, kept in a
    float32 model (so its logits are the exact function of the bf16 weights; buffers such as the
    rotary frequencies stay float32, as transformers computes them)."""
    model = make_hf_model(family, seed=seed, **{**FP8_TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    return model


def fp8_state_dict(
    model,
    block: tuple[int, int] = BLOCK,
    scale_dtype: torch.dtype = torch.float32,
    not_converted: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors: quantized linear weights plus scales; the rest as they are."""
    out = {}
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, t in state.items():
        module = name.removesuffix(".weight")
        quantize = name.endswith(".weight") and module.split(".")[-1] in QUANTIZED_MODULES
        if quantize and not any(module.endswith(m) for m in not_converted):
            out[name], out[name + "_scale_inv"] = quantize_block_fp8(t, block, scale_dtype)
        else:
            out[name] = t.detach().to(torch.bfloat16, copy=True).contiguous()
    return out


def save_fp8_checkpoint(
    model,
    path: Path,
    *,
    block: tuple[int, int] = BLOCK,
    scale_dtype: torch.dtype = torch.float32,
    not_converted: tuple[str, ...] = (),
) -> Path:
    """Write `model` (`bf16_model`) as a block-FP8 checkpoint folder; returns `path`."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = fp8_state_dict(model, block, scale_dtype, not_converted)
    files = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for name, t in tensors.items():
        files[f"model-0000{2 if name.endswith('_scale_inv') else 1}-of-00002.safetensors"][name] = t
    weight_map = {}
    for file, part in files.items():
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {
        **model.config.to_dict(),
        "architectures": [type(model).__name__],
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
            **({"modules_to_not_convert": list(not_converted)} if not_converted else {}),
        },
    }
    config.pop("dtype", None)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def naive_dequant(w: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    """The block-wise product by indexing, element by element (float32)."""
    rows, cols = w.shape
    i = torch.arange(rows)[:, None] // block[0]
    j = torch.arange(cols)[None, :] // block[1]
    return w.float() * s.float()[i, j]
