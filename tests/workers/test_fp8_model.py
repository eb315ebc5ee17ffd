"""Block-FP8 models in one process, the post-load hook: exact against transformers with
the dequantized weights, re-entrant over updates in any bucket order, memory flat.

Tolerance against the bf16 original (the same random model before quantization), float32 logits
over 32 teacher-forced positions, measured on CPU over 3 seeds x {qwen3, llama}, compute in
float32 and bf16: RMS error / RMS logit 0.10-0.16 and max error / max |logit| 0.11-0.22; top-1
agreement 0.69-0.94. The FP8 format itself is exact: against transformers running the
dequantized weights the float32 logits agree within 4e-6. The random test model amplifies the
~2.6% RMS weight error of e4m3 (3 mantissa bits); the bounds below keep a margin over these.
"""

from __future__ import annotations

import random

import pytest
import torch
from fp8_testutil import BLOCK, FP8_CONFIG, bf16_model, fp8_state_dict, naive_dequant

from workers.distributed import TensorParallel
from workers.errors import WeightCheckError
from workers.model_loader import get_load_format
from workers.models import ModelConfig, build_model

RMS_REL_TOL, MAX_REL_TOL, MIN_AGREEMENT = 0.2, 0.3, 0.6
LLAMA = dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)


# ---- the model: exactness, tolerance, re-entrant post hook ------------------------------------


def fp8_model_config(hf, **quant) -> ModelConfig:
    raw = {**hf.config.to_dict(), "architectures": [type(hf).__name__]}
    raw["quantization_config"] = {**FP8_CONFIG, **quant}
    return ModelConfig.from_dict(raw)


def fp8_model(hf, dtype=torch.float32, **quant):
    config = fp8_model_config(hf, **quant)
    return build_model(config, tp=TensorParallel(), dtype=dtype, device=torch.device("cpu"))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, model.new_cache(len(ids)), 0).float()


IDS = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def pair():
    """Two bf16 originals of the same shape (the checkpoints updates alternate between)."""
    return bf16_model("qwen3", seed=0), bf16_model("qwen3", seed=1)


@pytest.mark.parametrize(
    "family, overrides", [("qwen3", {}), ("llama", LLAMA)], ids=["qwen3", "llama"]
)
def test_fp8_model_is_exactly_transformers_on_the_dequantized_weights(family, overrides):
    hf = bf16_model(family, **overrides, intermediate_size=320)  # 320: a partial last block
    state = fp8_state_dict(hf)
    model = fp8_model(hf)
    assert model.load_weights(state.items()) == set(model.checkpoint_names()) == set(state)
    model.process_weights_after_loading()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name + "_scale_inv" in state:
                p.copy_(naive_dequant(state[name], state[name + "_scale_inv"], BLOCK))
        want = hf(IDS[None]).logits[0]
    torch.testing.assert_close(logits(model, IDS), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize(
    "family, overrides", [("qwen3", {}), ("llama", LLAMA)], ids=["qwen3", "llama"]
)
def test_fp8_model_stays_close_to_the_bf16_original(family, overrides, dtype):
    hf = bf16_model(family, **overrides)
    model = fp8_model(hf, dtype)
    model.load_weights(fp8_state_dict(hf).items())
    model.process_weights_after_loading()
    with torch.no_grad():
        want = hf(IDS[None]).logits[0]
    got = logits(model, IDS)
    err = got - want
    assert err.pow(2).mean().sqrt() <= RMS_REL_TOL * want.pow(2).mean().sqrt()
    assert err.abs().max() <= MAX_REL_TOL * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= MIN_AGREEMENT


def test_checkpoint_tensors_are_the_fp8_files_and_bf16_scales_widen_exactly(pair):
    hf = pair[0]
    model = fp8_model(hf, torch.bfloat16)
    state = fp8_state_dict(hf, scale_dtype=torch.bfloat16)  # as some Qwen3-FP8 checkpoints
    model.load_weights(state.items())
    served = dict(model.checkpoint_tensors())
    assert set(served) == set(state)
    for name, t in state.items():
        if name.endswith("_scale_inv"):
            assert served[name].dtype == torch.float32 and torch.equal(served[name], t.float())
        else:
            assert served[name].dtype == t.dtype
            assert torch.equal(served[name].view(torch.uint8), t.view(torch.uint8))


def test_a_tensor_of_the_wrong_dtype_is_refused_before_any_write(pair):
    model = fp8_model(pair[0])
    state = fp8_state_dict(pair[0])
    name = "model.layers.0.mlp.down_proj.weight"
    problems = model.check_weights([(name, "bfloat16", tuple(state[name].shape))])
    assert problems == [f"{name}: dtype bfloat16 is not float8_e4m3fn"]
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(WeightCheckError, match="float8_e4m3fn"):
        model.load_weights([(name, state[name].to(torch.bfloat16))])
    assert torch.equal(
        model.model.layers[0].mlp.down_proj.weight.view(torch.uint8), before.view(torch.uint8)
    )
    assert (
        model.check_weights(
            [(name + "_scale_inv", "bfloat16", tuple(state[name + "_scale_inv"].shape))]
        )
        == []
    )


def in_buckets(state: dict, seed: int, bucket: int = 5):
    """The checkpoint in shuffled buckets: a weight and its scale usually land apart."""
    items = list(state.items())
    random.Random(seed).shuffle(items)
    return [items[i : i + bucket] for i in range(0, len(items), bucket)]


def storage(model) -> dict[str, tuple[int, torch.dtype, tuple[int, ...]]]:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {n: (t.data_ptr(), t.dtype, tuple(t.shape)) for n, t in tensors.items()}


def snapshot(model) -> dict[str, torch.Tensor]:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {n: t.detach().clone() for n, t in tensors.items()}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8))
        if a[n].dtype.itemsize == 1
        else torch.equal(a[n], b[n])
        for n in a
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_updates_after_a_dummy_load_are_a_fresh_load_bit_for_bit(pair, tmp_path, dtype):
    """dummy -> A -> B -> A, each update in shuffled buckets with one post hook at the end:
    every parameter and buffer, and the logits, equal those of a fresh load; nothing is
    re-allocated; running the hook again changes nothing."""
    states = [fp8_state_dict(hf) for hf in pair]
    fresh = []
    for state in states:
        model = fp8_model(pair[0], dtype)
        model.load_weights(state.items())
        model.process_weights_after_loading()
        fresh.append((snapshot(model), logits(model, IDS)))

    model = fp8_model(pair[0], dtype)
    get_load_format("dummy").load(model, tmp_path)
    layout = storage(model)
    for step, which in enumerate([0, 1, 0]):
        for bucket in in_buckets(states[which], seed=step):
            model.load_weights(bucket)
        model.process_weights_after_loading()
        assert storage(model) == layout
        assert same_bits(snapshot(model), fresh[which][0])
        assert torch.equal(logits(model, IDS), fresh[which][1])
    model.process_weights_after_loading()  # idempotent
    assert same_bits(snapshot(model), fresh[0][0])


def test_dummy_load_fills_fp8_parameters_and_their_forward_weights(pair, tmp_path):
    model = fp8_model(pair[0], torch.bfloat16)
    get_load_format("dummy").load(model, tmp_path)
    proj = model.model.layers[0].mlp.down_proj
    assert proj.weight.dtype == torch.float8_e4m3fn and proj.weight.float().abs().max() > 0
    assert torch.equal(
        proj.weight_dequant,
        naive_dequant(proj.weight, proj.weight_scale_inv, BLOCK).to(torch.bfloat16),
    )
    assert torch.isfinite(logits(model, IDS)).all()


def test_modules_to_not_convert_keep_their_layers_unquantized(pair):
    hf = pair[0]
    model = fp8_model(hf, modules_to_not_convert=["down_proj"])
    mlp = model.model.layers[1].mlp
    assert mlp.down_proj.quant is None and mlp.down_proj.weight.dtype == torch.float32
    assert not hasattr(mlp.down_proj, "weight_scale_inv")
    assert mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    state = fp8_state_dict(hf, not_converted=("down_proj",))
    assert model.load_weights(state.items()) == set(model.checkpoint_names())


@pytest.mark.gpu
def test_gpu_updates_are_fresh_loads_and_memory_stays_flat(pair, tmp_path):
    device = torch.device("cuda", 0)
    states = [fp8_state_dict(hf) for hf in pair]
    config = fp8_model_config(pair[0])

    def build():
        return build_model(config, tp=TensorParallel(), dtype=torch.bfloat16, device=device)

    fresh = []
    for state in states:
        model = build()
        model.load_weights(state.items())
        model.process_weights_after_loading()
        fresh.append(snapshot(model))
        del model
    model = build()
    get_load_format("dummy").load(model, tmp_path)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(device)
    for step, which in enumerate([0, 1, 0, 1]):
        for bucket in in_buckets(states[which], seed=step):
            model.load_weights([(n, t.to(device)) for n, t in bucket])
        model.process_weights_after_loading()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(device) == baseline
        assert same_bits(snapshot(model), fresh[which])
