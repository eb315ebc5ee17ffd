"""FP8 block-quantized linear weights, in the Hugging Face format of DeepSeek-V3 and Qwen3-FP8.

Checkpoint format (`quantization_config: {"quant_method": "fp8", "weight_block_size": [128, 128],
"activation_scheme": "dynamic"}`): each quantized linear weight W [out, in] is stored in
float8_e4m3fn next to `<name>_scale_inv` [ceil(out / 128), ceil(in / 128)] (float32; bfloat16 or
float16 in some Qwen3 checkpoints), and W_real[i, j] = W[i, j] * scale_inv[i // 128, j // 128].
Norms, embeddings and the LM head stay unquantized.

Design (re-entrant updates, memory flat):
- The parameters `load_weights` writes keep the checkpoint layout: `weight` (float8_e4m3fn, this
  rank's rows/columns) and `weight_scale_inv` (float32, this rank's row/column blocks; bfloat16
  and float16 scales are widened exactly). They are never rebound, reshaped or overwritten by
  anything but a load, so a weight and its scale may arrive in any order, in different buckets.
- The forward uses `weight_dequant`, a buffer of the compute dtype allocated once when the model
  is built. `process_weights_after_loading` recomputes it from the checkpoint-layout parameters
  (float32 product, rounded once to the compute dtype), in place, in slabs of bounded size: it
  allocates nothing that outlives the call, and running it twice gives the same bytes.
- On every device the weights are *dequantized* (weight-only quantization, W8A16 numerics): no
  FP8 scaled matmul, no activation quantization. This is simple and bit-reproducible across
  loads; it costs one compute-dtype copy of each quantized weight besides the FP8 bytes.
- Tensor parallelism shards the scales like the weights: a column-parallel weight is cut along
  its output rows, so every rank's rows must start and end on a block boundary (likewise the
  input columns of a row-parallel weight); a layout where they do not is refused at build time,
  naming the layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from workers.errors import ConfigError
from workers.layers.sharding import Part, ShardLayout, make_param

FP8_DTYPE = torch.float8_e4m3fn
SCALE_DTYPE = torch.float32
# Scale dtypes a checkpoint may carry: each converts to float32 exactly.
SCALE_CHECKPOINT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE_SUFFIX = "_scale_inv"
_SLAB_ELEMENTS = 1 << 24  # dequantization works on slabs of at most this many weight elements


@dataclass(frozen=True, kw_only=True)
class Fp8Config:
    """config.json's `quantization_config` for block-wise FP8 (validated; unknown schemes refused)."""

    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    modules_to_not_convert: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.weight_block_size) != 2 or min(self.weight_block_size) < 1:
            raise ConfigError(
                f"quantization_config: weight_block_size must be two positive ints, "
                f"got {list(self.weight_block_size)}"
            )
        if self.activation_scheme != "dynamic":
            raise ConfigError(
                f"quantization_config: activation_scheme {self.activation_scheme!r} is not "
                "supported (only 'dynamic': no activation scales in the checkpoint)"
            )

    @classmethod
    def from_hf(cls, raw: dict[str, Any] | None) -> Fp8Config | None:
        """None for an unquantized model; ConfigError for a scheme this server cannot serve."""
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise ConfigError(f"quantization_config must be an object, got {raw!r}")
        method = raw.get("quant_method")
        if method != "fp8":
            raise ConfigError(f"quantization_config: quant_method {method!r}; supported: 'fp8'")
        if raw.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"quantization_config: fmt {raw['fmt']!r}; supported: 'e4m3'")
        block = raw.get("weight_block_size")
        if block is None:
            raise ConfigError(
                "quantization_config: per-tensor FP8 (no weight_block_size) is not supported; "
                "only block-wise FP8 checkpoints (e.g. weight_block_size [128, 128])"
            )
        skip = [*(raw.get("modules_to_not_convert") or ()), *(raw.get("ignored_layers") or ())]
        try:
            return cls(
                weight_block_size=tuple(int(b) for b in block),
                activation_scheme=str(raw.get("activation_scheme", "dynamic")),
                modules_to_not_convert=tuple(str(m) for m in skip),
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"quantization_config: {e}") from e

    def skips(self, module: str) -> bool:
        """Whether checkpoint module `module` (e.g. "model.layers.0.mlp.down_proj") stays
        unquantized: an entry names it, a suffix of it ("down_proj", "mlp.down_proj") or a
        parent of it ("model.layers.0")."""
        return any(
            module == m or module.endswith("." + m) or module.startswith(m + ".")
            for m in self.modules_to_not_convert
        )

    def for_modules(self, modules: Iterable[str]) -> Fp8Config | None:
        """The config a (possibly fused) layer of these checkpoint modules uses, or None when
        they all stay unquantized; a fused layer cannot mix the two."""
        modules = list(modules)
        skipped = [m for m in modules if self.skips(m)]
        if not skipped:
            return self
        if len(skipped) == len(modules):
            return None
        raise ConfigError(
            f"quantization_config: {skipped} are not converted but {sorted(set(modules) - set(skipped))} "
            "are, and they are fused into one layer"
        )


def layer_quant(quant: Fp8Config | None, *modules: str) -> Fp8Config | None:
    """`quant.for_modules(modules)`, None for an unquantized model."""
    return None if quant is None else quant.for_modules(modules)


def scale_layout(weight: ShardLayout, block: tuple[int, int], where: str) -> ShardLayout:
    """The layout of `weight`'s block scales: the same parts and tensor-parallel dim, block counts
    instead of features. Raises ConfigError, naming `where`, when a rank's slice of a part does not
    start and end on block boundaries."""
    if weight.dim is None:
        raise ValueError(f"{where}: an FP8 linear weight is always tensor-parallel sharded")
    dim, b = weight.dim, block[weight.dim]
    parts = []
    for part in weight.parts:
        full, n = part.full_shape[dim], weight.piece_len(part)
        if part.chunks > 1 and (n * part.chunks != full or n % b):
            what = "output rows" if dim == 0 else "input columns"
            name = "" if part.shard_id is None else f" (shard {part.shard_id!r})"
            raise ConfigError(
                f"{where}{name}: {full} {what} split into {part.chunks} tensor-parallel pieces of "
                f"{full / part.chunks:g} do not fall on the FP8 scale blocks of {b}; use a TP size "
                f"that divides {full} / {b} = {full / b:g} blocks"
            )
        rows, cols = part.full_shape
        blocks = (-(-rows // block[0]), -(-cols // block[1]))
        parts.append(Part(part.shard_id, blocks, part.chunks))
    return ShardLayout(dim, tuple(parts), weight.rank, weight.size)


def fp8_params(
    layout: ShardLayout, quant: Fp8Config, where: str
) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """(`weight` float8_e4m3fn, `weight_scale_inv` float32), checkpoint layout, each accepting
    only the dtypes a block-FP8 checkpoint carries (see `CheckpointWeights.check_weights`)."""
    weight = make_param(layout, dtype=FP8_DTYPE)
    weight.checkpoint_dtypes = (FP8_DTYPE,)
    scale = make_param(scale_layout(layout, quant.weight_block_size, where), dtype=SCALE_DTYPE)
    scale.checkpoint_dtypes = SCALE_CHECKPOINT_DTYPES
    return weight, scale


@torch.no_grad()
def dequantize_block_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    *,
    out: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W[i, j] * scale_inv[i // block[0], j // block[1]], computed in float32 and rounded once to
    `out`'s dtype (or `dtype`), slab by slab (memory bounded by `_SLAB_ELEMENTS`)."""
    rows, cols = weight.shape
    bo, bi = block
    want = (-(-rows // bo), -(-cols // bi))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not fit weight {rows}x{cols}")
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype, device=weight.device)
    step = max(1, _SLAB_ELEMENTS // max(1, cols * bo)) * bo  # whole block rows per slab
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s = scale_inv[r0 // bo : -(-r1 // bo)].to(torch.float32)
        s = s.repeat_interleave(bo, dim=0)[: r1 - r0].repeat_interleave(bi, dim=1)[:, :cols]
        out[r0:r1].copy_(weight[r0:r1].to(torch.float32).mul_(s))
    return out


@torch.no_grad()
def dequantize_sharded(
    out: torch.Tensor, weight: torch.nn.Parameter, scale_inv: torch.nn.Parameter, block
) -> None:
    """Fill `out` (the local forward weight) part by part: each part of a fused parameter has its
    own scale blocks (q / k / v, gate / up), so parts are dequantized separately."""
    w_layout, s_layout = weight.shard_layout, scale_inv.shard_layout
    dim = w_layout.dim
    w_off = s_off = 0
    for w_part, s_part in zip(w_layout.parts, s_layout.parts, strict=True):
        n, m = w_layout.piece_len(w_part), s_layout.piece_len(s_part)
        dequantize_block_fp8(
            weight.data.narrow(dim, w_off, n),
            scale_inv.data.narrow(dim, s_off, m),
            block,
            out=out.narrow(dim, w_off, n),
        )
        w_off, s_off = w_off + n, s_off + m
