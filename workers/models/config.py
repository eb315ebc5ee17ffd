"""`ModelConfig`: what the reference model needs from a Hugging Face config.json, parsed without
`transformers` (it is not a runtime dependency). Accepts both config layouts in circulation:
`rope_parameters` (transformers 5) and `rope_theta` + `rope_scaling` (transformers 4).
`quantization_config` of block-wise FP8 checkpoints becomes `quantization` (`layers.fp8`).
Qwen3-MoE's fields (`num_experts` or `num_local_experts`, `num_experts_per_tok`,
`moe_intermediate_size`, `norm_topk_prob`, `decoder_sparse_step`, `mlp_only_layers`) say which
layers are sparse (`is_moe_layer`); dense architectures have `num_experts == 0`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_engine import json_depth
from workers.errors import ConfigError
from workers.layers.fp8 import Fp8Config
from workers.layers.rotary import RopeParams

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM",)
QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeParams
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    dtype: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization: Fp8Config | None = None  # block-wise FP8 linear weights; None: unquantized
    num_experts: int = 0  # 0: every layer dense
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
        for name in (*sizes, "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"config.json: {name} must be positive, got {getattr(self, name)}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"config.json: {self.num_heads} attention heads do not group over "
                f"{self.num_kv_heads} key/value heads"
            )
        if self.num_experts:
            self._check_moe()
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"config.json: unsupported dtype {self.dtype!r}; supported: {DTYPES}")

    def _check_moe(self) -> None:
        if self.num_experts < 0 or not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok {self.num_experts_per_tok} must be in "
                f"1..num_experts ({self.num_experts})"
            )
        if self.moe_intermediate_size < 1 or self.decoder_sparse_step < 1:
            raise ConfigError(
                "config.json: moe_intermediate_size and decoder_sparse_step must be positive"
            )
        if self.quantization is not None:
            raise ConfigError("config.json: quantized mixture-of-experts models are not served")

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen3-MoE's rule: sparse unless listed in mlp_only_layers, every decoder_sparse_step."""
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> ModelConfig:
        path = Path(model_path)
        try:
            raw = json_depth.loads((path / "config.json").read_text(), what="config.json")
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path / 'config.json'}: {e}") from e
        eos = _eos_ids(raw.get("eos_token_id"))
        gen_path = path / "generation_config.json"
        if gen_path.exists():
            try:
                gen = json_depth.loads(gen_path.read_text(), what="generation_config.json")
                gen_eos = _eos_ids(gen.get("eos_token_id"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read {gen_path}: {e}") from e
            eos += tuple(i for i in gen_eos if i not in eos)
        return cls.from_dict(raw, eos_token_ids=eos)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, eos_token_ids: tuple[int, ...] = ()) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"config.json: architectures {archs} not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(
                f"config.json: hidden_act {raw['hidden_act']!r}; only 'silu' is served"
            )
        if raw.get("use_sliding_window") or "sliding_attention" in (raw.get("layer_types") or []):
            raise ConfigError("config.json: sliding-window attention is not supported")
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            max_pos = int(raw.get("max_position_embeddings", 2048))
            return cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope=_rope(raw, max_pos),
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                qk_norm=arch in QK_NORM_ARCHITECTURES,
                dtype=raw.get("dtype", raw.get("torch_dtype")),
                eos_token_ids=eos_token_ids,
                quantization=Fp8Config.from_hf(raw.get("quantization_config")),
                **(_moe(raw) if arch in MOE_ARCHITECTURES else {}),
            )
        except ConfigError:
            raise
        except KeyError as e:
            raise ConfigError(f"config.json lacks {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json: {e}") from e


def _moe(raw: dict[str, Any]) -> dict[str, Any]:
    experts = raw.get("num_experts", raw.get("num_local_experts"))
    if not experts:
        raise ConfigError("config.json: a mixture-of-experts model needs num_experts > 0")
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=int(raw["num_experts_per_tok"]),
        moe_intermediate_size=int(raw["moe_intermediate_size"]),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        decoder_sparse_step=int(raw.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(int(i) for i in raw.get("mlp_only_layers") or ()),
    )


def _rope(raw: dict[str, Any], max_pos: int) -> RopeParams:
    params = dict(raw.get("rope_parameters") or {})
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = dict(params["full_attention"])  # per-layer-type layout
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("config.json: partial_rotary_factor != 1 is not supported")
    original = params.get("original_max_position_embeddings")
    return RopeParams(
        rope_type=rope_type,
        theta=float(theta),
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(original) if original is not None else None,
        max_position=max_pos,
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
