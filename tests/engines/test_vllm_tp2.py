"""A real vLLM server at TP=2 (CPU build, ``VLLM_CPU_OMP_THREADS_BIND="0|1"``) with both doors:
the worker extension, which this server runs under ``CKPT_ENGINE_WIRE=upstream`` (the upstream
checkpoint-engine wire, driven by our updater with ``--wire upstream``), and the ``ckpt_engine``
weight-transfer backend (our wire, chosen in its init_info). One server for the module; the tests
run in file order. Last, a P2P join into it: a parameter-server job (2 ranks) holding the second
checkpoint saves its metas and stays up; a new job pulls from it with ``--update-method p2p``
over the weight-transfer backend. Each vLLM rank reports the rows its loaders read
(``workers.vllm.keeps``), so each receiving rank reads half of every sharded tensor; the weights
are then transformers' (greedy tokens) and exactly the checkpoint's (checksums of each rank's
shard). A join with a forged token is refused by the owners before any bucket reaches vLLM:
every rank keeps its weights exactly, and the updater resumes vLLM (nothing was written).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file
from vllm_testutil import (
    EXTENSION,
    expected_checksums,
    make_checkpoints,
    push,
    require_vllm,
    run_join,
    start_vllm,
)
from workers_testutil import poll, start_updater, stop_group

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


JOIN_TIMEOUT_S = 300  # a 2-rank torchrun job on 2 busy cores: imports, gloo, then the pull


def updater(*args: str, log: Path) -> subprocess.Popen:
    """A 2-rank CPU updater job into the vLLM instance, in its own process group."""
    common = ["--inference-parallel-size", str(TP), "--device", "cpu", "--timeout", "120"]
    return start_updater(*common, "--inference-api", "weight_transfer", *args, nproc=TP, log=log)


@pytest.fixture(scope="module")
def owners(vllm, ckpts, tmp_path_factory):
    """A parameter-server job holding checkpoint B: its metas file, while it stays up serving
    its host memory (it would push after 600 s; it is stopped before)."""
    tmp = tmp_path_factory.mktemp("p2p-owners")
    metas, log = tmp / "metas.json", tmp / "owners.log"
    proc = updater(
        "--checkpoint-path", str(ckpts["B"].path), "--endpoint", vllm.url,
        "--save-metas-file", str(metas), "--sleep-time", "600", log=log,
    )  # fmt: skip
    try:
        poll(lambda: metas.exists() or proc.poll() is not None, JOIN_TIMEOUT_S, "owners' metas")
        assert proc.poll() is None, log.read_text()
        yield metas
    finally:
        stop_group(proc)


def join(vllm, metas: Path, tmp: Path) -> tuple[int, str, list[dict]]:
    """A new job pulls the owners' checkpoint into the vLLM instance over P2P: (returncode,
    log, --json-out records)."""
    return run_join(updater, vllm.url, metas, tmp, JOIN_TIMEOUT_S)


def test_p2p_join_reads_only_each_ranks_rows_and_lands_exact_weights(vllm, ckpts, owners, tmp_path):
    assert vllm.greedy() == ckpts["A"].greedy()  # from the test before
    rc, out, records = join(vllm, owners, tmp_path)
    assert rc == 0, out + vllm.output()[-3000:]
    assert vllm.greedy() == ckpts["B"].greedy() != ckpts["A"].greedy()
    got = vllm.rpc("ckpt_engine_checksums")
    assert got == [expected_checksums(ckpts["B"].model, TP, r) for r in range(TP)]
    # each vLLM rank reported its rows: its receiver read half of every sharded tensor
    total = kept = 0
    for t in load_file(ckpts["B"].path / "model.safetensors").values():
        total += t.nbytes
        kept += t.nbytes if t.dim() == 1 else t.nbytes // 2
    read = {r["rank"]: (r["p2p_read_bytes"], r["p2p_sharded"]) for r in records}
    assert read == {0: (kept, True), 1: (kept, True)}, (read, total)
    assert kept < 0.55 * total


def test_a_p2p_join_with_a_wrong_token_is_refused_and_the_weights_kept(
    vllm, ckpts, owners, tmp_path
):
    before = vllm.rpc("ckpt_engine_checksums")
    forged = tmp_path / "metas.json"
    text = re.sub(r'"token":"[0-9a-f]+"', '"token":"' + "0" * 32 + '"', owners.read_text())
    assert text != owners.read_text()
    forged.write_text(text)
    forged.chmod(0o600)
    rc, out, _ = join(vllm, forged, tmp_path)
    assert rc != 0 and "refused: bad token" in out, out
    assert "refused before any write: vLLM resumed with its previous weights" in out, out
    # no worker got a bucket: every rank untouched, its weights exactly as before
    for status in vllm.rpc("ckpt_engine_status"):
        assert status["status"] == "ready", status
        assert status["detail"].startswith("update refused before any write"), status
    assert vllm.rpc("ckpt_engine_checksums") == before
    # every parameter-server rank said that no bucket went out: the updater resumed vLLM
    assert vllm.get("/is_paused").json()["is_paused"] is False
    assert vllm.greedy() == ckpts["B"].greedy()
