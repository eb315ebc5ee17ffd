"""End to end with a many-tensor Qwen3-MoE checkpoint on CPU (issue 17, part 2): 2 layers of
384 experts, about 2.3k checkpoint tensors, served at TP=2 with the experts fused and split over
the intermediate dim.

The tests run in file order on two module-scoped servers ("disk": checkpoint A loaded from disk;
"target": dummy weights waiting for an update): the disk server matches transformers' greedy
tokens and its /weights_info is the checkpoint files' sha256s (expert tensors in checkpoint
layout); a broadcast update (many buckets) fills the target with A; a P2P join moves checkpoint B
into the disk server from the host memory of a job that registered B (and serves it, asleep);
a TP=1 client forks from the target ("slice" mode: the fused experts gathered over the seed's
TP group, each sent as its two halves, one per seed rank) and verifies every tensor's sha256.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from workers_testutil import (
    KEY,
    NEW_TOKENS,
    PROMPT,
    free_port,
    hf_greedy,
    make_hf_model,
    poll,
    run_updater,
    save_checkpoint,
    start_server,
    start_updater,
    stop_group,
    wait_until_up,
)

from workers.models.weights import combined_digest, tensor_digest

pytestmark = pytest.mark.slow

MANY_EXPERTS = dict(num_experts=384, num_experts_per_tok=4, moe_intermediate_size=8)
GENERATE = {"input_ids": PROMPT, "max_new_tokens": NEW_TOKENS, "sampling_params": {"ignore_eos": True}}  # fmt: skip
COMMON = ["--tp", "2", "--device", "cpu", "--dtype", "float32", "--api-key", "secret"]
TE_SEED = "--remote-instance-weight-loader-start-seed-via-transfer-engine"
TE_ENV = {"CKPT_ENGINE_MOONCAKE_PROTOCOL": "tcp"}  # no RDMA device on the CI machine


def file_digests(path: Path) -> dict:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update({n: tensor_digest(t) for n, t in load_file(f).items()})
    return tensors


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{"A": (folder, hf model, {name: digest}), "B": ...}."""
    out = {}
    for name, seed in (("A", 0), ("B", 1)):
        model = make_hf_model("qwen3_moe", seed=seed, **MANY_EXPERTS)
        path = save_checkpoint(model, tmp_path_factory.mktemp(f"moe-{name}"))
        out[name] = (path, model, file_digests(path))
    return out


@pytest.fixture(scope="module")
def fleet(ckpts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-moe")
    path = ckpts["A"][0]
    servers = {
        "disk": start_server(path, *COMMON, log=tmp / "disk.log"),
        "target": start_server(
            path, *COMMON, "--load-format", "dummy", "--wait-for-initial-weights", TE_SEED,
            log=tmp / "target.log", env=TE_ENV,
        ),
    }  # fmt: skip
    try:
        for server in servers.values():
            wait_until_up(server, deadline_s=180)
        yield {**servers, "tmp": tmp}
    finally:
        for server in servers.values():
            server.stop()


def weights(server) -> dict:
    info = server.get("/weights_info", headers=KEY).json()
    assert info["status"] == "ready", info
    return info


def tokens(server) -> list[int]:
    r = server.post("/generate", GENERATE)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def test_disk_load_matches_transformers_and_the_checkpoint_files(fleet, ckpts):
    _, hf, digests = ckpts["A"]
    assert sum(".experts." in n for n in digests) == 2 * 384 * 3
    info = weights(fleet["disk"])
    assert info["tensors"] == digests and info["checksum"] == combined_digest(digests)
    assert tokens(fleet["disk"]) == hf_greedy(hf, PROMPT, NEW_TOKENS)[0]


def test_broadcast_update_in_many_buckets(fleet, ckpts):
    path, _, digests = ckpts["A"]
    small = {"CKPT_ENGINE_BUCKET_BYTES": str(1 << 20)}
    rc, out = run_updater(fleet["target"].url, path, nproc=2, device="cpu", env=small)
    assert rc == 0, out
    assert weights(fleet["target"])["tensors"] == digests
    assert tokens(fleet["target"]) == tokens(fleet["disk"])


def updater(*args: str, log: Path) -> subprocess.Popen:
    common = ["--inference-parallel-size", "2", "--api-key", "secret", "--device", "cpu"]
    return start_updater(*common, *args, nproc=2, log=log)


def test_p2p_join_moves_checkpoint_b(fleet, ckpts):
    path, hf, digests = ckpts["B"]
    tmp, metas = fleet["tmp"], fleet["tmp"] / "metas-B.json"
    owners = updater(
        "--checkpoint-path", str(path), "--endpoint", fleet["target"].url,
        "--save-metas-file", str(metas), "--sleep-time", "600", log=tmp / "A.log",
    )  # fmt: skip
    joiner = None
    try:
        poll(lambda: metas.exists() or owners.poll() is not None, 180, "the owners' metas file")
        assert owners.poll() is None, (tmp / "A.log").read_text()
        joiner = updater(
            "--load-metas-file", str(metas), "--update-method", "p2p",
            "--endpoint", fleet["disk"].url, "--timeout", "120", log=tmp / "B.log",
        )  # fmt: skip
        assert joiner.wait(timeout=240) == 0, (tmp / "B.log").read_text()
    finally:
        for proc in (joiner, owners):
            if proc is not None:
                stop_group(proc)
    assert weights(fleet["disk"])["tensors"] == digests
    assert tokens(fleet["disk"]) == hf_greedy(hf, PROMPT, NEW_TOKENS)[0]


@pytest.mark.parametrize(
    "backend, said",
    [("gloo", "slice mode"), ("transfer_engine", "one-sided (transfer_engine)")],
)
def test_tp1_client_forks_every_expert_from_the_tp2_seed(fleet, ckpts, backend, said):
    """gloo: the seed gathers each fused expert parameter and sends the client its pieces;
    transfer_engine (Mooncake over TCP): the client reads the rows it keeps of each expert
    (~100k ranges)."""
    seed = fleet["target"]
    args = ["--tp", "1", "--device", "cpu", "--dtype", "float32", "--api-key", "secret"]
    args += ["--load-format", "remote_instance", "--remote-instance-weight-loader-verify-checksums"]
    args += ["--remote-instance-weight-loader-seed-instance-ip", "127.0.0.1"]
    args += ["--remote-instance-weight-loader-seed-instance-service-port", seed.url.split(":")[-1]]
    if backend == "gloo":
        ports = json.dumps([free_port()])
        args += ["--remote-instance-weight-loader-send-weights-group-ports", ports]
    else:
        args += ["--remote-instance-weight-loader-backend", backend]
    log = fleet["tmp"] / f"fork-{backend}.log"
    client = start_server(ckpts["A"][0], *args, log=log, env=TE_ENV)
    try:
        wait_until_up(client, deadline_s=180)
        assert said in client.output() and "sha256 matches the seed's" in client.output()
        assert weights(client)["tensors"] == weights(seed)["tensors"]
        assert tokens(client) == tokens(seed)
    finally:
        client.stop()


def test_many_experts_model_is_built_fused():
    """The fused layout the servers above load into: 3 params per sparse layer, not 3 x 384."""
    from workers.distributed import TensorParallel
    from workers.models import ModelConfig, build_model

    raw = {**make_hf_model("qwen3_moe", **MANY_EXPERTS).config.to_dict()}
    config = ModelConfig.from_dict({**raw, "architectures": ["Qwen3MoeForCausalLM"]})
    model = build_model(
        config, tp=TensorParallel(), dtype=torch.float32, device=torch.device("meta")
    )
    experts = [n for n, _ in model.named_parameters() if ".experts." in n]
    assert len(experts) == 2 * 2 and len(model.checkpoint_names()) == 2 * 384 * 3 + 21
