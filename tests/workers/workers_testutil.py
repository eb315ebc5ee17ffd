"""Helpers for the workers tests: tiny random checkpoints and a server subprocess handle."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests
import torch

REPO = Path(__file__).resolve().parents[2]

PROMPT = [3, 17, 101, 5, 250, 64, 9]
NEW_TOKENS = 6
KEY = {"Authorization": "Bearer secret"}  # the API key of the servers started with "secret"

# The checkpoints the server tests serve (conftest.py `checkpoints`):
# qwen3: untied, 4 query / 2 KV heads (split over TP=2), ships a tokenizer.
# llama: tied embeddings, q/k/v/o and MLP biases, llama3 rope scaling, 1 KV head (replicated
# over TP=2).
FAMILIES = {
    "qwen3": dict(family="qwen3", overrides={}, tokenizer=True),
    "llama": dict(
        family="llama",
        overrides=dict(
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            num_key_value_heads=1,
            rope_theta=50000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        tokenizer=False,
    ),
}

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=512,
)


# Qwen3-MoE: TINY's attention, 8 experts of intermediate size 32, top 2 of them.
TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def hf_config(family: str, **overrides):
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

    cls = {"qwen3": Qwen3Config, "llama": LlamaConfig, "qwen3_moe": Qwen3MoeConfig}[family]
    base = {**TINY, **TINY_MOE} if family == "qwen3_moe" else TINY
    return cls(**{**base, **overrides})


def make_hf_model(family: str, *, seed: int = 0, **overrides):
    """A tiny random model in float32, every parameter (norms included) randomised, so that a
    misplaced tensor changes the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return model


def checkpoint_state(model) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes (checkpoint layout: transformers fuses MoE experts
    in memory and writes each expert's tensors apart)."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        state = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            state.update(load_file(f))
    return state


def save_checkpoint(model, path: Path, *, tokenizer: bool = False, **save_kwargs) -> Path:
    model.save_pretrained(path, **save_kwargs)
    if tokenizer:
        save_word_tokenizer(path / "tokenizer.json", model.config.vocab_size)
    return path


def save_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer: "w<i>" is token i (w0 doubles as the unknown token)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))


@torch.no_grad()
def hf_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens by full recomputation (no cache), and the logits each was picked from."""
    ids = list(prompt)
    rows = []
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        rows.append(logits)
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :], torch.stack(rows)


def free_port() -> int:
    """As tests/conftest.py's free_port (not imported: several conftest modules may exist)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_without_gpus(device: str, count: int) -> None:
    import pytest

    if device == "cuda" and torch.cuda.device_count() < count:
        pytest.skip(f"needs {count} CUDA GPUs")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def post(self, path: str, json=None, **kw) -> requests.Response:
        return requests.post(self.url + path, json=json, timeout=kw.pop("timeout", 60), **kw)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Kill the whole process group (front and ranks)."""
        stop_group(self.proc)


def stop_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """End a process started with start_new_session=True, and what it started: SIGTERM to its
    group first, SIGKILL after `grace_s`. The SIGTERM matters for torchrun, whose workers run in
    sessions of their own: a SIGKILLed torchrun cannot end them, a SIGTERMed one does."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(15)


def start_server(
    model_path: Path,
    *args: str,
    log: Path,
    env: dict | None = None,
    prefix: list[str] | None = None,
) -> Server:
    """`python -m workers.server` in its own process group, on a free port (not yet up), with
    `env` added to the environment; `prefix` (a command that execs the rest, e.g. `unshare`)
    runs before it."""
    port = free_port()
    cmd = [*(prefix or []), sys.executable, "-m", "workers.server", "--model-path", str(model_path)]
    cmd += ["--port", str(port), *args]
    return Server(proc=spawn(cmd, log, env), url=f"http://127.0.0.1:{port}", log=log)


def spawn(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """``cmd`` from the repo root in its own process group (stop it with stop_group), output to
    ``log``, ``env`` added to the environment."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )


def wait_until_up(server: Server, deadline_s: float = 120.0) -> None:
    """Poll /ping until it answers; fail early with the log if the server exits."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited ({server.proc.returncode}):\n{server.output()}")
        try:
            if requests.get(server.url + "/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not up after {deadline_s}s:\n{server.output()}")


def poll(predicate, deadline_s: float, what: str):
    """Call `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {deadline_s}s: {what}")
        time.sleep(0.2)


UPDATER_TIMEOUT_S = 180


def start_updater(*args: str, nproc: int, log: Path, env: dict | None = None) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node <nproc> examples/update.py <args>` in the
    background, in its own process group (stop it with stop_group), output to ``log``."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc-per-node", str(nproc), "examples/update.py", *args]
    return spawn(cmd, log, env)


def run_updater(
    url: str, checkpoint: Path, *extra: str, nproc: int, device: str, env: dict | None = None
) -> tuple[int, str]:
    """`torchrun --standalone --nproc-per-node <nproc> examples/update.py` pushing `checkpoint`
    into the server at `url` (one instance of `nproc` ranks, API key "secret"): (returncode,
    output). The whole process group is killed past UPDATER_TIMEOUT_S (the test fails)."""
    import pytest

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc-per-node", str(nproc), "examples/update.py"]
    cmd += ["--checkpoint-path", str(checkpoint), "--endpoint", url, "--device", device]
    cmd += ["--inference-parallel-size", str(nproc), "--api-key", "secret", "--timeout", "120"]
    proc = subprocess.Popen(
        [*cmd, *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        out, _ = proc.communicate(timeout=UPDATER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        out, _ = proc.communicate()
        pytest.fail(f"examples/update.py did not finish in {UPDATER_TIMEOUT_S} s:\n{out}")
    finally:
        stop_group(proc)
    return proc.returncode, out
