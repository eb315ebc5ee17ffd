"""A P2P join into a real vLLM server (CPU build) at TP=2 running a tiny Qwen3-MoE (4 experts per
layer, each expert's tensors apart in the checkpoint), loaded from disk (checkpoint A): a
parameter-server job (2 ranks) holding checkpoint B saves its metas and stays up; a new job pulls
B from it with ``--update-method p2p`` over the weight-transfer backend. Each vLLM rank reports
the rows and columns its loaders read (``workers.vllm.keeps``), experts included: every expert's
``gate_proj``/``up_proj`` rows and ``down_proj`` columns of its half of the intermediate dim. So
each receiving rank reads half of every expert tensor; the weights are then transformers'
(greedy tokens) and exactly the checkpoint's on each rank (checksums of each rank's shard,
experts in checkpoint order: vLLM's CPU prepack undone).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from vllm_testutil import EXTENSION, Checkpoint, require_vllm, start_vllm
from workers_testutil import make_hf_model, poll, save_checkpoint, start_updater, stop_group

pytestmark = pytest.mark.slow

TP = 2
EXPERTS = 4
MOE = dict(head_dim=32, num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=32)
JOIN_TIMEOUT_S = 300  # a 2-rank torchrun job on 2 busy cores: imports, gloo, then the pull


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    require_vllm()
    tmp = tmp_path_factory.mktemp("vllm-moe-tp2-ckpts")
    out = {}
    for name, seed in (("A", 0), ("B", 1)):
        model = make_hf_model("qwen3_moe", seed=seed, **MOE)
        out[name] = Checkpoint(save_checkpoint(model, tmp / name, tokenizer=True), model)
    return out


@pytest.fixture(scope="module")
def vllm(ckpts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-moe-tp2")
    args = ["--worker-extension-cls", EXTENSION]
    args += ["--weight-transfer-config", '{"backend": "ckpt_engine"}']
    server = start_vllm(ckpts["A"].path, *args, tp=TP, log=tmp / "vllm.log", load_format="auto")
    yield server
    server.stop()


def shard(files: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The checkpoint tensors as TP rank ``rank`` of ``TP`` holds them in vLLM: q/k/v rows fused
    into qkv_proj, o_proj columns, embedding and LM head vocabulary rows, each layer's experts
    stacked into w13_weight (gate_proj then up_proj rows of this rank) and w2_weight (down_proj
    columns of this rank), the rest whole."""

    def mine(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return t.chunk(TP, dim)[rank]

    out = {}
    for name, tensor in files.items():
        if ".mlp.experts." in name or ".k_proj." in name or ".v_proj." in name:
            continue
        if ".q_proj." in name:
            parts = [files[name.replace(".q_proj.", f".{x}_proj.")] for x in "qkv"]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat([mine(p) for p in parts])
        elif ".o_proj." in name:
            out[name] = mine(tensor, 1)
        elif "embed_tokens" in name or name.startswith("lm_head"):
            out[name] = mine(tensor)
        else:
            out[name] = tensor
    layers = {n.partition(".mlp.experts.")[0] for n in files if ".mlp.experts." in n}
    for layer in sorted(layers):
        experts = f"{layer}.mlp.experts"

        def part(e: int, proj: str, experts=experts) -> torch.Tensor:
            return files[f"{experts}.{e}.{proj}.weight"]

        fused = f"{experts}.routed_experts"
        out[f"{fused}.w13_weight"] = torch.stack(
            [
                torch.cat([mine(part(e, "gate_proj")), mine(part(e, "up_proj"))])
                for e in range(EXPERTS)
            ]
        )
        out[f"{fused}.w2_weight"] = torch.stack(
            [mine(part(e, "down_proj"), 1) for e in range(EXPERTS)]
        )
    return out


def expected_checksums(checkpoint: Checkpoint, rank: int) -> dict[str, str]:
    """What ``ckpt_engine_checksums`` of TP rank ``rank`` reports for ``checkpoint``'s files."""
    files = load_file(checkpoint.path / "model.safetensors")
    return {
        f"0:{n}": hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for n, t in shard(files, rank).items()
    }


def kept_bytes(checkpoint: Checkpoint) -> tuple[int, int, int]:
    """(bytes of the checkpoint, bytes one rank keeps, bytes of the experts): every projection
    (attention, experts), the embedding and the LM head are split over the ranks; norms and
    the router (``mlp.gate``) are read whole."""
    total = kept = experts = 0
    for name, t in load_file(checkpoint.path / "model.safetensors").items():
        total += t.nbytes
        split = "_proj." in name or "embed_tokens" in name or name.startswith("lm_head")
        kept += t.nbytes // TP if split else t.nbytes
        experts += t.nbytes if ".mlp.experts." in name else 0
    return total, kept, experts


def updater(*args: str, log: Path) -> subprocess.Popen:
    """A 2-rank CPU updater job into the vLLM instance, in its own process group."""
    common = ["--inference-parallel-size", str(TP), "--device", "cpu", "--timeout", "120"]
    return start_updater(*common, "--inference-api", "weight_transfer", *args, nproc=TP, log=log)


def test_loaded_from_disk_each_rank_holds_its_shard(vllm, ckpts):
    assert vllm.greedy() == ckpts["A"].greedy()
    got = vllm.rpc("ckpt_engine_checksums")
    assert got == [expected_checksums(ckpts["A"], r) for r in range(TP)]


def test_p2p_join_reads_half_of_each_expert_per_rank_and_lands_exact_weights(vllm, ckpts, tmp_path):
    metas, owners_log = tmp_path / "metas.json", tmp_path / "owners.log"
    owners = updater(
        "--checkpoint-path", str(ckpts["B"].path), "--endpoint", vllm.url,
        "--save-metas-file", str(metas), "--sleep-time", "600", log=owners_log,
    )  # fmt: skip
    try:
        poll(lambda: metas.exists() or owners.poll() is not None, JOIN_TIMEOUT_S, "owners' metas")
        assert owners.poll() is None, owners_log.read_text()
        log, report = tmp_path / "join.log", tmp_path / "join.jsonl"
        join = updater(
            "--load-metas-file", str(metas), "--update-method", "p2p", "--endpoint", vllm.url,
            "--json-out", str(report), log=log,
        )  # fmt: skip
        try:
            rc = join.wait(timeout=JOIN_TIMEOUT_S)
        finally:
            stop_group(join)
    finally:
        stop_group(owners)
    assert rc == 0, log.read_text() + vllm.output()[-3000:]
    assert vllm.greedy() == ckpts["B"].greedy() != ckpts["A"].greedy()
    got = vllm.rpc("ckpt_engine_checksums")
    assert got == [expected_checksums(ckpts["B"], r) for r in range(TP)]
    # each rank read half of every expert tensor (and of every other split tensor)
    total, kept, experts = kept_bytes(ckpts["B"])
    records = [json.loads(x) for x in report.read_text().splitlines() if x.strip()]
    read = {r["rank"]: (r["p2p_read_bytes"], r["p2p_sharded"]) for r in records}
    assert read == {0: (kept, True), 1: (kept, True)}, (read, total, experts)
    assert kept < 0.55 * total
