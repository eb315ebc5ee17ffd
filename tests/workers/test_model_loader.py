"""Load formats: safetensors (single file and index), dummy, and the strict accounting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from workers_testutil import make_hf_model, save_checkpoint

from workers.distributed import TensorParallel
from workers.errors import (
    ConfigError,
    DuplicateWeightError,
    MissingWeightsError,
    WeightCheckError,
    WeightLoadError,
)
from workers.model_loader import LOAD_FORMATS, WeightAccounting, get_load_format
from workers.models import ModelConfig, build_model


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model("qwen3")


def fresh(path):
    config = ModelConfig.from_pretrained(path)
    model = build_model(
        config, tp=TensorParallel(), dtype=torch.float32, device=torch.device("cpu")
    )
    for p in model.parameters():
        p.data.fill_(7.0)  # a value no loader writes
    return model


def assert_holds(model, hf_model):
    got = dict(model.checkpoint_tensors())
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "index"])
def test_auto_loads_every_tensor(hf_model, tmp_path, sharded):
    kwargs = {"max_shard_size": "40KB"} if sharded else {}
    path = save_checkpoint(hf_model, tmp_path / "ckpt", **kwargs)
    assert (path / "model.safetensors.index.json").exists() == sharded
    model = fresh(path)
    get_load_format("auto").load(model, path)
    assert_holds(model, hf_model)


def _rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (
            lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"),
            MissingWeightsError,
            "lacks 1 tensor.*model.layers.1.self_attn.v_proj.weight",
        ),
        (
            lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}),
            WeightCheckError,
            "model.layers.0.mlp.extra.weight: the model has no such tensor",
        ),
        (
            lambda t: t.update({"model.norm.weight": torch.zeros(32)}),
            WeightCheckError,
            r"model.norm.weight: shape \(32,\)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_auto_refuses_before_writing(hf_model, tmp_path, edit, error, message):
    path = save_checkpoint(hf_model, tmp_path / "ckpt")
    _rewrite(path, edit)
    model = fresh(path)
    with pytest.raises(error, match=message):
        get_load_format("auto").load(model, path)
    assert all((p == 7.0).all() for p in model.parameters())


def test_index_naming_a_missing_file(hf_model, tmp_path):
    path = save_checkpoint(hf_model, tmp_path / "ckpt", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[0]
    (path / gone).unlink()
    with pytest.raises(WeightLoadError, match=gone):
        get_load_format("auto").load(fresh(path), path)


def test_no_safetensors_at_all(hf_model, tmp_path):
    path = save_checkpoint(hf_model, tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    with pytest.raises(WeightLoadError, match=r"no \*\.safetensors"):
        get_load_format("auto").load(fresh(path), path)


def test_dummy_writes_every_parameter_deterministically(hf_model, tmp_path):
    path = save_checkpoint(hf_model, tmp_path / "ckpt")
    a, b = fresh(path), fresh(path)
    get_load_format("dummy", seed=3).load(a, path)
    get_load_format("dummy", seed=3).load(b, path)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert pa.abs().max() <= 1e-3 and torch.equal(pa, pb)


def test_unknown_format_lists_the_supported_ones():
    with pytest.raises(ConfigError, match="unknown load format 'npz'; supported: auto, dummy"):
        get_load_format("npz")
    assert set(LOAD_FORMATS) == {"auto", "dummy", "remote_instance"}
    with pytest.raises(ConfigError, match="'remote_instance' needs the server's settings"):
        get_load_format("remote_instance")


def test_accounting():
    acct = WeightAccounting(["a", "b", "c"], "test")
    acct.add(["b"])
    acct.add(["a"])
    with pytest.raises(DuplicateWeightError, match="a given twice"):
        acct.add(["a"])
    assert acct.missing() == ["c"]
    with pytest.raises(MissingWeightsError, match="test lacks 1 tensor"):
        acct.finish()
