"""A real vLLM server at TP=2 (CPU build, ``VLLM_CPU_OMP_THREADS_BIND="0|1"``) with both doors:
the worker extension, which this server runs under ``CKPT_ENGINE_WIRE=upstream`` (the upstream
checkpoint-engine wire, driven by our updater with ``--wire upstream``), and the ``ckpt_engine``
weight-transfer backend (our wire, chosen in its init_info). One server for the module; the tests
run in file order.
"""

from __future__ import annotations

import pytest
from vllm_testutil import EXTENSION, make_checkpoints, push, require_vllm, start_vllm

pytestmark = pytest.mark.slow

TP = 2


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    require_vllm()
    return make_checkpoints(tmp_path_factory.mktemp("vllm-ckpts"))


@pytest.fixture(scope="module")
def vllm(ckpts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-tp2")
    args = ["--worker-extension-cls", EXTENSION]
    args += ["--weight-transfer-config", '{"backend": "ckpt_engine"}']
    env = {"CKPT_ENGINE_WIRE": "upstream"}
    server = start_vllm(ckpts["A"].path, *args, tp=TP, log=tmp / "vllm.log", env=env)
    yield server
    server.stop()


def test_extension_over_the_upstream_wire_gives_transformers_greedy_tokens(vllm, ckpts):
    dummy = vllm.greedy()
    rc, out = push(vllm, ckpts["A"], "--wire", "upstream", tp=TP)
    assert rc == 0, out + vllm.output()[-3000:]
    assert vllm.greedy() == ckpts["A"].greedy() != dummy
    statuses = vllm.rpc("ckpt_engine_status")
    assert [s["status"] for s in statuses] == ["ready", "ready"]
    assert len({s["device"] for s in statuses}) == TP  # one device key per rank


def test_weight_transfer_backend_gives_the_second_checkpoint(vllm, ckpts):
    api = ("--inference-api", "weight_transfer", "--weight-version", "tp2-B")
    rc, out = push(vllm, ckpts["B"], *api, tp=TP)  # from A
    assert rc == 0, out + vllm.output()[-3000:]
    assert vllm.greedy() == ckpts["B"].greedy() != ckpts["A"].greedy()
    assert vllm.get("/weight_info").json()["weight_version"] == "tp2-B"


def test_a_bad_checkpoint_is_refused_on_every_rank(vllm, ckpts):
    api = ("--inference-api", "weight_transfer")
    rc, out = push(vllm, ckpts["wrong_shape"], *api, tp=TP)  # from B
    assert rc != 0 and "refused before any write: vLLM resumed" in out, out
    assert vllm.greedy() == ckpts["B"].greedy()


def test_the_next_update_after_a_refusal_lands(vllm, ckpts):
    rc, out = push(vllm, ckpts["A"], "--inference-api", "weight_transfer", tp=TP)  # from B
    assert rc == 0, out + vllm.output()[-3000:]
    assert vllm.greedy() == ckpts["A"].greedy()
