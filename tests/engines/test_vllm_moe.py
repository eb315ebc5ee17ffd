"""A tiny Qwen3-MoE (4 experts per layer, each expert's tensors apart in the checkpoint) in a
real vLLM server (CPU build, TP=1), loaded from disk, then updated through both vLLM paths: the
worker extension (``/collective_rpc``, the updater's default) and vLLM's weight-transfer API
(``--inference-api weight_transfer``). One server for the module, with both paths enabled; the
tests run in file order and each states the weights it starts from.

Checksums (``ckpt_engine_checksums``) are of every parameter as the model computes with it,
experts in checkpoint order (vLLM's CPU prepack undone): they are compared with the checkpoint
files' tensors, fused as vLLM fuses them.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from vllm_testutil import (
    EXTENSION,
    Checkpoint,
    kill_updater_mid_update,
    moe_shard,
    push,
    require_vllm,
    sha256s,
    start_vllm,
)
from workers_testutil import make_hf_model, save_checkpoint

pytestmark = pytest.mark.slow

EXPERTS = 4
MOE = dict(head_dim=32, num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=32)
WEIGHT_TRANSFER = ("--inference-api", "weight_transfer")
SMALL_BUCKETS = {"CKPT_ENGINE_BUCKET_BYTES": "4096"}  # experts of one layer over many buckets
WRONG_SHAPE = "model.layers.0.mlp.experts.1.up_proj.weight"
MISSING = "model.layers.1.mlp.experts.3.down_proj.weight"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """ "A", "B": tiny random Qwen3-MoE models; "wrong_shape": A with one expert's up_proj of 16
    rows, not 32; "missing_expert": A without one expert's
    down_proj. Without ckpt-engine's expert check, vLLM 0.32 accepts both (its loader fills
    what it is given and leaves the rest of the layer as it finds it)."""
    require_vllm()
    tmp = tmp_path_factory.mktemp("vllm-moe-ckpts")
    out = {}
    for name, seed in (("A", 0), ("B", 1)):
        model = make_hf_model("qwen3_moe", seed=seed, **MOE)
        out[name] = Checkpoint(save_checkpoint(model, tmp / name, tokenizer=True), model)
    tensors = load_file(out["A"].path / "model.safetensors")
    for bad, edit in (
        ("wrong_shape", lambda t: t.update({WRONG_SHAPE: torch.zeros(16, 64)})),
        ("missing_expert", lambda t: t.pop(MISSING)),
    ):
        changed = dict(tensors)
        edit(changed)
        (tmp / bad).mkdir()
        save_file(changed, tmp / bad / "model.safetensors", metadata={"format": "pt"})
        out[bad] = Checkpoint(tmp / bad, None)
    return out


def expected_checksums(checkpoint: Checkpoint) -> dict[str, str]:
    """What ``ckpt_engine_checksums`` of a TP=1 worker reports for ``checkpoint``'s files."""
    files = load_file(checkpoint.path / "model.safetensors")
    return sha256s(moe_shard(files, experts=EXPERTS))


@pytest.fixture(scope="module")
def vllm(ckpts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-moe")
    delay_file = tmp / "bucket-delay"
    server = start_vllm(
        ckpts["A"].path,
        "--worker-extension-cls",
        EXTENSION,
        "--weight-transfer-config",
        '{"backend": "ckpt_engine"}',
        log=tmp / "vllm.log",
        load_format="auto",
        env={"CKPT_ENGINE_TEST_BUCKET_DELAY_FILE": str(delay_file)},
    )
    server.delay_file = delay_file
    yield server
    server.stop()


def checksums(vllm) -> dict[str, str]:
    (result,) = vllm.rpc("ckpt_engine_checksums")
    return result


def status(vllm) -> dict:
    (result,) = vllm.rpc("ckpt_engine_status")
    return result


def test_loaded_from_disk_it_matches_transformers(vllm, ckpts):
    assert vllm.greedy() == ckpts["A"].greedy()
    got = checksums(vllm)
    assert any(".routed_experts.w13_weight" in n for n in got)
    assert got == expected_checksums(ckpts["A"])


def test_the_fork_refuses_moe_naming_the_experts(vllm):
    (answer,) = vllm.rpc("ckpt_engine_fork_manifest")
    assert answer["success"] is False, answer
    assert "model.layers.0.mlp.experts.routed_experts.w13_weight" in answer["message"], answer


def test_worker_extension_update_gives_the_second_checkpoint_exactly(vllm, ckpts):
    rc, out = push(vllm, ckpts["B"])  # from A, through /collective_rpc
    assert rc == 0, out + vllm.output()[-3000:]
    assert vllm.greedy() == ckpts["B"].greedy() != ckpts["A"].greedy()
    assert checksums(vllm) == expected_checksums(ckpts["B"])
    assert status(vllm)["status"] == "ready"


def test_weight_transfer_update_in_small_buckets_gives_the_first_back_exactly(vllm, ckpts):
    rc, out = push(vllm, ckpts["A"], *WEIGHT_TRANSFER, "--weight-version", "a", env=SMALL_BUCKETS)
    assert rc == 0, out + vllm.output()[-3000:]  # from B
    assert vllm.get("/weight_info").json()["weight_version"] == "a"
    assert not vllm.get("/is_paused").json()["is_paused"]
    assert vllm.greedy() == ckpts["A"].greedy()
    assert checksums(vllm) == expected_checksums(ckpts["A"])


@pytest.mark.parametrize(
    "bad, api",
    [("wrong_shape", ()), ("missing_expert", ()), ("wrong_shape", WEIGHT_TRANSFER)],
    ids=[
        "wrong_shape-collective_rpc",
        "missing_expert-collective_rpc",
        "wrong_shape-weight_transfer",
    ],
)
def test_bad_expert_tensor_is_refused_before_any_write(vllm, ckpts, bad, api):
    before = checksums(vllm)  # A
    rc, out = push(vllm, ckpts[bad], *api, env=SMALL_BUCKETS)
    assert rc != 0 and "WeightCheckError" in out, out
    want = {"wrong_shape": f"{WRONG_SHAPE}: shape [16, 64]", "missing_expert": MISSING}[bad]
    assert want in out, out
    assert checksums(vllm) == before
    assert vllm.greedy() == ckpts["A"].greedy()
    if api:
        assert "refused before any write: vLLM resumed with its previous weights" in out, out
        assert not vllm.get("/is_paused").json()["is_paused"]
    else:
        info = status(vllm)
        assert info["status"] == "ready" and "refused before any write" in info["detail"]


def test_killed_updater_leaves_a_servable_mix_and_the_next_update_is_exact(vllm, ckpts, tmp_path):
    kill_updater_mid_update(vllm, ckpts["B"], log=tmp_path / "updater.log")  # from A, way (1)
    info = status(vllm)
    assert info["status"] == "weights_inconsistent", info
    vllm.greedy()  # servable: layers done hold B (prepacked), the others A

    rc, out = push(vllm, ckpts["B"], *WEIGHT_TRANSFER, "--weight-version", "b", env=SMALL_BUCKETS)
    assert rc == 0, out
    assert vllm.greedy() == ckpts["B"].greedy()
    assert checksums(vllm) == expected_checksums(ckpts["B"])
    assert status(vllm)["status"] == "ready"  # one status per model, whichever way updates it
