"""Real vLLM servers for the tests: vLLM's CPU build in its own venv (scripts/setup_vllm.sh),
started as ``python -m vllm.entrypoints.openai.api_server`` on a tiny Qwen3 checkpoint made by the
tests, with ``--load-format dummy`` (the tests push the weights).

Skip policy: the tests skip when the venv is missing, unless ``CKPT_ENGINE_REQUIRE_VLLM=1``
(scripts/test.sh, hence CI, sets it after creating the venv): then a missing venv fails them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from workers_testutil import (
    REPO,
    free_port,
    hf_greedy,
    make_hf_model,
    poll,
    run_updater,
    save_checkpoint,
    stop_group,
)

VENV = Path(os.environ.get("CKPT_ENGINE_VLLM_VENV") or REPO / ".venv-vllm")
if not VENV.is_absolute():
    VENV = REPO / VENV
PYTHON = VENV / "bin" / "python"
START_TIMEOUT_S = 420  # vLLM takes 30-60 s to start on 2 busy cores; TP=2 more
PROMPT = [3, 17, 101, 5, 250, 64, 9]
NEW_TOKENS = 6
EXTENSION = "workers.vllm.CkptEngineWorkerExtension"


def require_vllm() -> None:
    if (VENV / ".ckpt-engine-ready").exists() and PYTHON.exists():
        return
    message = f"no vLLM venv at {VENV} (create it: bash scripts/setup_vllm.sh)"
    if os.environ.get("CKPT_ENGINE_REQUIRE_VLLM") == "1":
        pytest.fail(message + "; CKPT_ENGINE_REQUIRE_VLLM=1 requires it")
    pytest.skip(message)


@dataclass
class Checkpoint:
    path: Path
    model: object  # the transformers model it was saved from (None for broken ones)

    def greedy(self) -> list[int]:
        return hf_greedy(self.model, PROMPT, NEW_TOKENS)[0]


def make_checkpoints(tmp: Path) -> dict[str, Checkpoint]:
    """ "A", "B": tiny Qwen3 models (head_dim 32: vLLM's CPU attention refuses 16);
    "wrong_shape": an MLP of another width; "unknown_name": A plus a tensor the model lacks;
    "missing_tensor": A without one norm."""
    from safetensors.torch import load_file, save_file

    out = {}
    for name, seed, extra in (
        ("A", 0, {}),
        ("B", 1, {}),
        ("wrong_shape", 2, {"intermediate_size": 96}),
    ):
        model = make_hf_model("qwen3", seed=seed, head_dim=32, **extra)
        path = save_checkpoint(model, tmp / name, tokenizer=True)
        out[name] = Checkpoint(path, model)
    unknown = tmp / "unknown_name"
    unknown.mkdir()
    tensors = load_file(out["A"].path / "model.safetensors")
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(8, 64)
    save_file(tensors, unknown / "model.safetensors", metadata={"format": "pt"})
    out["unknown_name"] = Checkpoint(unknown, None)
    missing = tmp / "missing_tensor"
    missing.mkdir()
    tensors = load_file(out["A"].path / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    out["missing_tensor"] = Checkpoint(missing, None)
    return out


def expected_checksums(model, tp: int = 1, rank: int = 0) -> dict[str, str]:
    """What ``ckpt_engine_checksums`` of TP rank ``rank`` of ``tp`` reports for a transformers
    Qwen3 model: vLLM's fused qkv_proj / gate_up_proj of this rank's rows, o_proj / down_proj
    of its columns, embedding and LM head of its vocabulary rows (the vocabulary must split
    into multiples of vLLM's padding, 64, and the KV heads over the ranks), the rest whole."""
    params = {n: p.detach().float() for n, p in model.named_parameters()}
    assert model.config.vocab_size % (64 * tp) == 0
    assert model.config.num_key_value_heads % tp == 0

    def mine(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return t.chunk(tp, dim)[rank]

    out = {}
    for name, tensor in params.items():
        if ".q_proj." in name:
            base = name.replace(".q_proj.", ".")
            parts = [params[base.replace("self_attn.", f"self_attn.{x}_proj.")] for x in "qkv"]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat([mine(p) for p in parts])
        elif ".gate_proj." in name:
            up = params[name.replace("gate_proj", "up_proj")]
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([mine(tensor), mine(up)])
        elif any(f".{x}_proj." in name for x in ("o", "down")):
            out[name] = mine(tensor, 1)
        elif "embed_tokens" in name or name.startswith("lm_head"):
            out[name] = mine(tensor)
        elif not any(f".{x}_proj." in name for x in ("k", "v", "up")):
            out[name] = tensor
    return sha256s(out)


def moe_shard(
    files: dict[str, torch.Tensor], *, experts: int, tp: int = 1, rank: int = 0, ep: bool = False
) -> dict[str, torch.Tensor]:
    """A Qwen3-MoE checkpoint's tensors as TP rank ``rank`` of ``tp`` holds them in vLLM: q/k/v
    rows fused into qkv_proj, o_proj columns, embedding and LM head vocabulary rows, each layer's
    ``experts`` stacked into w13_weight (gate_proj then up_proj rows of this rank) and w2_weight
    (down_proj columns of this rank), the rest whole. ``ep``: the rank's own experts, whole."""

    def mine(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return t.chunk(tp, dim)[rank]

    def expert(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return t if ep else mine(t, dim)

    ids = range(rank * experts // tp, (rank + 1) * experts // tp) if ep else range(experts)
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
        prefix = f"{layer}.mlp.experts"

        def part(e: int, proj: str, prefix=prefix) -> torch.Tensor:
            return files[f"{prefix}.{e}.{proj}.weight"]

        fused = f"{prefix}.routed_experts"
        out[f"{fused}.w13_weight"] = torch.stack(
            [torch.cat([expert(part(e, "gate_proj")), expert(part(e, "up_proj"))]) for e in ids]
        )
        out[f"{fused}.w2_weight"] = torch.stack([expert(part(e, "down_proj"), 1) for e in ids])
    return out


def sha256s(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``ckpt_engine_checksums``' form: ``0:<name>`` -> sha256 of the tensor's bytes."""
    return {
        f"0:{n}": hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for n, t in tensors.items()
    }


def run_join(updater, url: str, metas: Path, tmp: Path, timeout_s: float):
    """A new updater job (``updater(*args, log=)`` starts it) pulls the checkpoint of the owners
    whose metas are in ``metas`` into the instance at ``url`` over P2P: (returncode, its log,
    its --json-out records)."""
    log, report = tmp / "join.log", tmp / "join.jsonl"
    proc = updater(
        "--load-metas-file", str(metas), "--update-method", "p2p", "--endpoint", url,
        "--json-out", str(report), log=log,
    )  # fmt: skip
    try:
        rc = proc.wait(timeout=timeout_s)
    finally:
        stop_group(proc)
    text = report.read_text() if report.exists() else ""
    return rc, log.read_text(), [json.loads(x) for x in text.splitlines() if x.strip()]


@dataclass
class VllmServer:
    proc: subprocess.Popen
    url: str
    log: Path
    model: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def post(self, path: str, body: dict | None = None, timeout: float = 120) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=timeout)

    def get(self, path: str, timeout: float = 60) -> requests.Response:
        return requests.get(self.url + path, timeout=timeout)

    def greedy(self) -> list[int]:
        body = {"model": self.model, "prompt": PROMPT, "max_tokens": NEW_TOKENS}
        body.update(temperature=0, ignore_eos=True, return_token_ids=True)
        r = self.post("/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    def rpc(self, method: str, *args) -> list:
        r = self.post("/collective_rpc", {"method": method, "args": list(args)})
        assert r.status_code == 200, f"{method}: HTTP {r.status_code} {r.text}"
        return r.json()["results"]

    def stop(self) -> None:
        stop_group(self.proc)


def start_vllm(
    checkpoint: Path,
    *args: str,
    log: Path,
    tp: int = 1,
    env: dict | None = None,
    load_format: str = "dummy",
) -> VllmServer:
    """A vLLM server on a free port with dummy weights (or ``load_format``), in its own process
    group, up and healthy (fails with its log otherwise)."""
    port = free_port()
    cmd = [str(PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--load-format", load_format]
    cmd += ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4"]
    cmd += ["--enforce-eager", "--tensor-parallel-size", str(tp), *args]
    full_env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    full_env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1" if tp == 2 else "auto"
    full_env.pop("VIRTUAL_ENV", None)
    full_env.update(env or {})
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=full_env,
        )
    server = VllmServer(proc, f"http://127.0.0.1:{port}", log, str(checkpoint))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({proc.returncode}):\n{server.output()[-6000:]}")
            try:
                if requests.get(server.url + "/health", timeout=5).status_code == 200:
                    return server
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"vLLM not up after {START_TIMEOUT_S} s:\n{server.output()[-6000:]}"
                )
            time.sleep(0.5)
    except BaseException:
        server.stop()
        raise


def push(server: VllmServer, checkpoint: Checkpoint, *extra: str, tp: int = 1, env=None):
    """The updater (`tp` CPU ranks, one instance) into `server`: (returncode, output)."""
    return run_updater(server.url, checkpoint.path, *extra, nproc=tp, device="cpu", env=env)


def kill_updater_mid_update(server: VllmServer, checkpoint: Checkpoint, *extra: str, log: Path):
    """Start the updater (small buckets) while ``server`` sleeps after each bucket it loads
    (CKPT_ENGINE_TEST_BUCKET_DELAY_FILE, which its fixture set), kill the updater's process
    group once the server has loaded 3 buckets, and return."""
    seen = len(server.output())
    server.delay_file.write_text("0.5")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc-per-node", "1", "examples/update.py"]
    cmd += ["--device", "cpu", "--checkpoint-path", str(checkpoint.path), "--endpoint", server.url]
    cmd += ["--inference-parallel-size", "1", "--timeout", "120", *extra]
    env = {**os.environ, "CKPT_ENGINE_BUCKET_BYTES": "4096"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    try:
        poll(
            lambda: "test delay: bucket 2 loaded" in server.output()[seen:],
            120,
            f"the server loading bucket 2 (updater log: {log})",
        )
    finally:
        stop_group(proc)
        server.delay_file.unlink()
