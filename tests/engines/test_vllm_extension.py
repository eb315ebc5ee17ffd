"""The worker extension inside a real vLLM server (CPU build, TP=1), driven by our updater through
``POST /collective_rpc``. One server for the module; the tests run in file order and each states
the weights it starts from.
"""

from __future__ import annotations

import pytest
from vllm_testutil import (
    EXTENSION,
    expected_checksums,
    kill_updater_mid_update,
    make_checkpoints,
    push,
    require_vllm,
    start_vllm,
)

pytestmark = pytest.mark.slow

SMALL_BUCKETS = {"CKPT_ENGINE_BUCKET_BYTES": "4096"}  # ~60 buckets; layers span several


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    require_vllm()
    return make_checkpoints(tmp_path_factory.mktemp("vllm-ckpts"))


@pytest.fixture(scope="module")
def vllm(ckpts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-ext")
    delay_file = tmp / "bucket-delay"
    env = {"CKPT_ENGINE_TEST_BUCKET_DELAY_FILE": str(delay_file)}
    server = start_vllm(
        ckpts["A"].path, "--worker-extension-cls", EXTENSION, log=tmp / "vllm.log", env=env
    )
    server.delay_file = delay_file
    yield server
    server.stop()


def status(vllm) -> dict:
    (result,) = vllm.rpc("ckpt_engine_status")
    return result


def test_first_update_gives_transformers_greedy_tokens(vllm, ckpts):
    dummy = vllm.greedy()
    rc, out = push(vllm, ckpts["A"])
    assert rc == 0, out + vllm.output()[-3000:]
    assert vllm.greedy() == ckpts["A"].greedy() != dummy
    assert status(vllm)["status"] == "ready"


def test_second_checkpoint_switches_to_its_reference(vllm, ckpts):
    rc, out = push(vllm, ckpts["B"])  # from A
    assert rc == 0, out
    assert vllm.greedy() == ckpts["B"].greedy() != ckpts["A"].greedy()


def test_many_small_buckets_give_exact_weights(vllm, ckpts):
    rc, out = push(vllm, ckpts["A"], env=SMALL_BUCKETS)  # from B
    assert rc == 0, out
    (got,) = vllm.rpc("ckpt_engine_checksums")
    assert got == expected_checksums(ckpts["A"].model)
    assert vllm.greedy() == ckpts["A"].greedy()


@pytest.mark.parametrize("bad", ["unknown_name", "wrong_shape", "missing_tensor"])
def test_bad_checkpoint_is_refused_before_any_write(vllm, ckpts, bad):
    (before,) = vllm.rpc("ckpt_engine_checksums")  # A
    rc, out = push(vllm, ckpts[bad], env=SMALL_BUCKETS)
    assert rc != 0 and "(handshake)" in out and "WeightCheckError" in out, out
    want = {
        "unknown_name": "extra_proj",
        "wrong_shape": "model.layers.0.mlp.gate_proj.weight",
        "missing_tensor": "model.layers.1.post_attention_layernorm.weight",
    }[bad]
    assert want in out, out
    (after,) = vllm.rpc("ckpt_engine_checksums")
    assert after == before
    assert vllm.greedy() == ckpts["A"].greedy()
    info = status(vllm)
    assert info["status"] == "ready" and "refused before any write" in info["detail"]


def test_killed_updater_is_reported_and_the_next_update_recovers(vllm, ckpts, tmp_path):
    kill_updater_mid_update(vllm, ckpts["B"], log=tmp_path / "updater.log")  # from A
    info = status(vllm)  # answered once the update's RPC has ended
    assert info["status"] == "weights_inconsistent", info
    # SIGTERM: the updater aborts the update ("interrupted"); a harder death: "disconnected"
    assert "failed after writing weights: UpdateAborted" in info["detail"], info
    vllm.greedy()  # servable (no meta tensors left), if a mix of A and B

    rc, out = push(vllm, ckpts["B"], env=SMALL_BUCKETS)
    assert rc == 0, out
    assert vllm.greedy() == ckpts["B"].greedy()
    assert status(vllm)["status"] == "ready"
