"""A P2P join into a real vLLM server (CPU build) at TP=2 running a tiny Qwen3-MoE (4 experts per
layer, each expert's tensors apart in the checkpoint), loaded from disk (checkpoint A): a
parameter-server job (2 ranks) holding checkpoint B saves its metas and stays up; a new job pulls
B from it with ``--update-method p2p`` over the weight-transfer backend. Each vLLM rank reports
the rows and columns its loaders read (``workers.vllm.keeps``), experts included: every expert's
``gate_proj``/``up_proj`` rows and ``down_proj`` columns of its half of the intermediate dim. So
each receiving rank reads half of every expert tensor; the weights are then transformers'
(greedy tokens) and exactly the checkpoint's on each rank (checksums of each rank's shard,
experts in checkpoint order: vLLM's CPU prepack undone). Then the same with expert
parallelism (a second server, started after the first stops): each rank keeps its own 2 experts
whole and zero rows of the 2 others, so it reads none of them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file
from vllm_testutil import (
    EXTENSION,
    Checkpoint,
    moe_shard,
    require_vllm,
    run_join,
    sha256s,
    start_vllm,
)
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


def serve(ckpts, tmp_path_factory, *extra: str):
    tmp = tmp_path_factory.mktemp("vllm-moe-tp2")
    args = ["--worker-extension-cls", EXTENSION]
    args += ["--weight-transfer-config", '{"backend": "ckpt_engine"}', *extra]
    return start_vllm(ckpts["A"].path, *args, tp=TP, log=tmp / "vllm.log", load_format="auto")


@pytest.fixture(scope="class")
def vllm(ckpts, tmp_path_factory):
    server = serve(ckpts, tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(scope="class")
def vllm_ep(ckpts, tmp_path_factory):
    """Expert parallelism: rank r holds experts 2r and 2r + 1 whole (vLLM's linear placement)."""
    server = serve(ckpts, tmp_path_factory, "--enable-expert-parallel")
    yield server
    server.stop()


def expected_checksums(checkpoint: Checkpoint, *, ep: bool = False) -> list[dict[str, str]]:
    """What ``ckpt_engine_checksums`` reports for ``checkpoint``'s files, per TP rank."""
    files = load_file(checkpoint.path / "model.safetensors")
    return [sha256s(moe_shard(files, experts=EXPERTS, tp=TP, rank=r, ep=ep)) for r in range(TP)]


def kept_bytes(checkpoint: Checkpoint) -> tuple[int, int, int]:
    """(bytes of the checkpoint, bytes one rank keeps, bytes of the experts): every projection
    (attention, experts), the embedding and the LM head are split over the ranks (experts: half
    of each at TP, half of them whole at EP: the same bytes); norms and the router
    (``mlp.gate``) are read whole."""
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


def p2p_join(server, checkpoint: Checkpoint, tmp: Path) -> dict[int, tuple[int, bool]]:
    """A parameter-server job holding ``checkpoint`` saves its metas and stays up; a new job
    pulls from it into ``server`` over P2P. Returns each rank's (bytes read, sharded)."""
    metas, owners_log = tmp / "metas.json", tmp / "owners.log"
    owners = updater(
        "--checkpoint-path", str(checkpoint.path), "--endpoint", server.url,
        "--save-metas-file", str(metas), "--sleep-time", "600", log=owners_log,
    )  # fmt: skip
    try:
        poll(lambda: metas.exists() or owners.poll() is not None, JOIN_TIMEOUT_S, "owners' metas")
        assert owners.poll() is None, owners_log.read_text()
        rc, log, records = run_join(updater, server.url, metas, tmp, JOIN_TIMEOUT_S)
    finally:
        stop_group(owners)
    assert rc == 0, log + server.output()[-3000:]
    return {r["rank"]: (r["p2p_read_bytes"], r["p2p_sharded"]) for r in records}


class TestTensorParallel:
    def test_loaded_from_disk_each_rank_holds_its_shard(self, vllm, ckpts):
        assert vllm.greedy() == ckpts["A"].greedy()
        assert vllm.rpc("ckpt_engine_checksums") == expected_checksums(ckpts["A"])

    def test_p2p_join_reads_half_of_each_expert_per_rank_and_lands_exact_weights(
        self, vllm, ckpts, tmp_path
    ):
        read = p2p_join(vllm, ckpts["B"], tmp_path)
        assert vllm.greedy() == ckpts["B"].greedy() != ckpts["A"].greedy()
        assert vllm.rpc("ckpt_engine_checksums") == expected_checksums(ckpts["B"])
        # each rank read half of every expert tensor (and of every other split tensor)
        total, kept, experts = kept_bytes(ckpts["B"])
        assert read == {0: (kept, True), 1: (kept, True)}, (read, total, experts)
        assert kept < 0.55 * total


class TestExpertParallel:
    """No tokens: vLLM 0.32's CPU MoE kernel crashes (SIGSEGV in csrc/cpu/cpu_fused_moe.cpp,
    fused_moe_impl) on the first request with expert parallelism; the weights are checked by
    the checksums alone."""

    def test_loaded_from_disk_each_rank_holds_its_experts(self, vllm_ep, ckpts):
        assert vllm_ep.rpc("ckpt_engine_checksums") == expected_checksums(ckpts["A"], ep=True)

    def test_p2p_join_reads_only_the_ranks_experts_and_lands_exact_weights(
        self, vllm_ep, ckpts, tmp_path
    ):
        read = p2p_join(vllm_ep, ckpts["B"], tmp_path)
        want = expected_checksums(ckpts["B"], ep=True)
        assert (
            vllm_ep.rpc("ckpt_engine_checksums") == want != expected_checksums(ckpts["A"], ep=True)
        )
        # each rank read its 2 experts whole, none of the 2 others (zero rows kept)
        total, kept, experts = kept_bytes(ckpts["B"])
        assert read == {0: (kept, True), 1: (kept, True)}, (read, total, experts)
