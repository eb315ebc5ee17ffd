"""The ``ckpt_engine`` backend of vLLM's weight-transfer engines inside a real vLLM server (CPU
build, TP=1, no worker extension), driven by ``examples/update.py --inference-api
weight_transfer`` through vLLM's RL endpoints. One server for the module; the tests run in file
order and each states the weights it starts from.
"""

from __future__ import annotations

import pytest
from vllm_testutil import (
    kill_updater_mid_update,
    make_checkpoints,
    push,
    require_vllm,
    start_vllm,
)

pytestmark = pytest.mark.slow

API = ("--inference-api", "weight_transfer")
SMALL_BUCKETS = {"CKPT_ENGINE_BUCKET_BYTES": "4096"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    require_vllm()
    return make_checkpoints(tmp_path_factory.mktemp("vllm-ckpts"))


@pytest.fixture(scope="module")
def vllm(ckpts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-native")
    delay_file = tmp / "bucket-delay"
    env = {"CKPT_ENGINE_TEST_BUCKET_DELAY_FILE": str(delay_file)}
    config = '{"backend": "ckpt_engine"}'
    server = start_vllm(
        ckpts["A"].path, "--weight-transfer-config", config, log=tmp / "vllm.log", env=env
    )
    server.delay_file = delay_file
    yield server
    server.stop()


def paused(vllm) -> bool:
    r = vllm.get("/is_paused")
    assert r.status_code == 200, r.text
    return r.json()["is_paused"]


def test_first_update_in_many_small_buckets_gives_transformers_greedy_tokens(vllm, ckpts):
    dummy = vllm.greedy()
    rc, out = push(vllm, ckpts["A"], *API, "--weight-version", "step-1", env=SMALL_BUCKETS)
    assert rc == 0, out + vllm.output()[-3000:]
    assert not paused(vllm)
    assert vllm.get("/weight_info").json()["weight_version"] == "step-1"
    assert vllm.greedy() == ckpts["A"].greedy() != dummy


def test_second_checkpoint_switches_to_its_reference(vllm, ckpts):
    rc, out = push(vllm, ckpts["B"], *API, "--weight-version", "step-2")  # from A
    assert rc == 0, out
    assert vllm.greedy() == ckpts["B"].greedy() != ckpts["A"].greedy()
    assert vllm.get("/weight_info").json()["weight_version"] == "step-2"


@pytest.mark.parametrize("bad", ["unknown_name", "wrong_shape"])
def test_bad_checkpoint_is_refused_before_any_write_and_vllm_resumes(vllm, ckpts, bad):
    version = vllm.get("/weight_info").json()["weight_version"]
    rc, out = push(vllm, ckpts[bad], *API, "--weight-version", "bad", env=SMALL_BUCKETS)
    assert rc != 0 and "WeightCheckError" in out, out
    assert "refused before any write: vLLM resumed with its previous weights" in out, out
    assert not paused(vllm)
    assert vllm.get("/weight_info").json()["weight_version"] == version
    assert vllm.greedy() == ckpts["B"].greedy()


def test_killed_updater_leaves_vllm_paused_until_a_good_update(vllm, ckpts, tmp_path):
    kill_updater_mid_update(vllm, ckpts["A"], *API, log=tmp_path / "updater.log")  # from B
    assert paused(vllm)  # no request sees the mix
    assert "ckpt_engine weight update failed" in vllm.output()

    rc, out = push(vllm, ckpts["A"], *API, "--weight-version", "step-3", env=SMALL_BUCKETS)
    assert rc == 0, out
    assert not paused(vllm)
    assert vllm.greedy() == ckpts["A"].greedy()
    assert vllm.get("/weight_info").json()["weight_version"] == "step-3"
