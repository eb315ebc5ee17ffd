"""workers.vllm.experts' accounting of expert tensors (pure: fake layers with the attributes of
vLLM's ``RoutedExperts``). The real layers, their loader and the CPU repack run in
tests/engines/test_vllm_moe.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from workers.errors import WorkersError
from workers.vllm import experts as experts_mod
from workers.vllm.experts import expected_tensors, expert_problems

LAYER = "model.layers.0.mlp.experts"


def fake_layer(*, experts=2, inter=8, hidden=4, tp=1, bias=False, mapping=None):
    def get_expert_mapping():
        if mapping is not None:
            return mapping
        return [
            ("experts.w13_" if s != "w2" else "experts.w2_", f"experts.{e}.{p}.", e, s)
            for e in range(experts)
            for p, s in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))
        ]

    config = SimpleNamespace(
        intermediate_size_per_partition_unpadded=inter // tp,
        tp_size=tp,
        hidden_dim_unpadded=hidden,
        has_bias=bias,
    )
    return SimpleNamespace(
        layer_name=LAYER, moe_config=config, get_expert_mapping=get_expert_mapping
    )


def test_expected_tensors_are_full_checkpoint_shapes_at_any_tp():
    want = expected_tensors(fake_layer(tp=2))
    assert len(want) == 6
    assert want[f"{LAYER}.1.gate_proj.weight"] == (8, 4)
    assert want[f"{LAYER}.1.up_proj.weight"] == (8, 4)
    assert want[f"{LAYER}.0.down_proj.weight"] == (4, 8)


def test_expected_tensors_with_bias():
    want = expected_tensors(fake_layer(bias=True))
    assert want[f"{LAYER}.0.up_proj.bias"] == (8,) and want[f"{LAYER}.0.down_proj.bias"] == (4,)


def test_an_undeclared_mapping_is_an_error_naming_it():
    layer = fake_layer(mapping=[("experts.w13_", "block_sparse_moe.0.w1.", 0, "w1")])
    with pytest.raises(WorkersError, match=r"block_sparse_moe\.0\.w1"):
        expected_tensors(layer)


def manifest(**edits):
    """The complete manifest of fake_layer(), then edits: name -> shape (None: removed)."""
    rows = {n: s for n, s in expected_tensors(fake_layer()).items()}
    rows["model.layers.0.mlp.gate.weight"] = (2, 4)
    for name, shape in edits.items():
        name = f"{LAYER}.{name}"
        if shape is None:
            rows.pop(name)
        else:
            rows[name] = shape
    return [(n, torch.float32, s) for n, s in rows.items()]


@pytest.mark.parametrize(
    "edits, expect",
    [
        ({}, []),
        (
            {"1.up_proj.weight": (4, 4)},
            ["1.up_proj.weight: shape [4, 4], the model's experts take [8, 4]"],
        ),
        (
            {"0.down_proj.weight": None},
            ["1 expert tensors not in the update", "0.down_proj.weight"],
        ),
        (
            {"2.gate_proj.weight": (8, 4)},
            ["2.gate_proj.weight: not an expert tensor of this model"],
        ),
        ({"0.gate_proj.weight": (8, 4, 1)}, ["0.gate_proj.weight: shape [8, 4, 1]"]),
    ],
    ids=["complete", "wrong_shape", "missing", "unknown_expert", "extra_dim"],
)
def test_expert_problems_name_the_tensor(edits, expect):
    problems = expert_problems({LAYER: expected_tensors(fake_layer())}, manifest(**edits))
    text = "\n".join(problems)
    assert bool(problems) == bool(expect), problems
    for piece in expect:
        assert piece in text, text


def test_layers_whose_names_extend_each_other_are_told_apart_in_update_order():
    """Layer 1's names are not layer 10's (nor ``experts2``'s); problems come in the order of
    the update, not of the names."""
    want = {
        name: {k.replace(LAYER, name): v for k, v in expected_tensors(fake_layer()).items()}
        for name in ("model.layers.1.mlp.experts", "model.layers.10.mlp.experts")
    }
    shapes = {n: s for w in want.values() for n, s in w.items()}
    shapes["model.layers.10.mlp.experts.1.up_proj.weight"] = (9, 9)
    shapes.pop("model.layers.1.mlp.experts.1.up_proj.weight")
    shapes["model.layers.1.mlp.experts.1.up_proj.weight"] = (7, 4)
    shapes["model.layers.1.mlp.experts.9.up_proj.weight"] = (8, 4)
    shapes["model.layers.1.mlp.experts2.0.up_proj.weight"] = (1,)  # another layer's
    rows = [(n, torch.float32, s) for n, s in reversed(shapes.items())]
    problems = expert_problems(want, rows)
    assert [p.split(":")[0] for p in problems] == [  # layer by layer, each in update order
        "model.layers.1.mlp.experts.9.up_proj.weight",
        "model.layers.1.mlp.experts.1.up_proj.weight",
        "model.layers.10.mlp.experts.1.up_proj.weight",
    ]


def test_a_checkpoint_of_fused_experts_is_left_to_vllm():
    fused = [
        (f"{LAYER}.gate_up_proj", torch.float32, (2, 16, 4)),
        (f"{LAYER}.down_proj", torch.float32, (2, 4, 8)),
    ]
    assert expert_problems({LAYER: expected_tensors(fake_layer())}, fused) == []


def test_a_repack_patch_left_by_a_failed_update_is_replaced_not_wrapped(monkeypatch):
    """An update whose undo never ran (its abandon failed) must not make the next one prepack
    twice."""
    calls = []

    class Method:
        def process_weights_after_loading(self, layer):
            calls.append("process")

    method = Method()
    layer = SimpleNamespace(quant_method=method)
    cpu = SimpleNamespace(process_weights_after_loading=lambda layer: calls.append("repack"))
    monkeypatch.setattr(experts_mod, "moe_layers", lambda model: [layer])
    monkeypatch.setattr(experts_mod, "_cpu_experts", lambda layer: cpu)
    experts_mod.repack_after_reload(None)  # its undo is never called
    undo = experts_mod.repack_after_reload(None)
    method.process_weights_after_loading(layer)
    assert calls == ["process", "repack"]
    undo()
    calls.clear()
    method.process_weights_after_loading(layer)
    assert calls == ["process"]


@pytest.mark.parametrize("per_expert", [True, False], ids=["per_expert", "across_experts"])
def test_unpacking_caches_one_expert_when_the_prepack_permutes_each_alike(monkeypatch, per_expert):
    """The checksum's inverse permutation is kept for one expert (8 bytes per element of one
    expert, not of the layer) when the prepack permutes each expert within itself; a prepack
    that mixes experts gets the whole permutation. Either way the weights come back in
    checkpoint order."""
    import sys

    def prepack(w, isa):  # same shape, elements moved: each expert transposed, or all flipped
        moved = w.transpose(1, 2) if per_expert else w.flip(0, 2)
        return moved.contiguous().view(w.shape)

    fake = SimpleNamespace(_custom_ops=SimpleNamespace(cpu_prepack_moe_weight=prepack))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm._custom_ops", fake._custom_ops)
    experts_mod._expert_permutation.cache_clear()
    shape = (5, 6, 7)
    perm = experts_mod._expert_permutation(shape, torch.bfloat16, "vec")
    assert perm.shape == ((1, 42) if per_expert else (1, 210))
    w = torch.randn(shape).to(torch.bfloat16)
    assert torch.equal(experts_mod._unpermuted(prepack(w, "vec"), "vec"), w)
    experts_mod._expert_permutation.cache_clear()
