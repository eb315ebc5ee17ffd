"""`python -m workers.demo` / `ckpt-engine-demo` (what `bash scripts/demo.sh` runs): one update,
end to end, on this machine.

1. make a small random Qwen3 checkpoint with transformers (from a config: nothing is downloaded)
   and a word-level tokenizer;
2. start the reference server on it, TP=2, with dummy weights and `--wait-for-initial-weights`
   (it answers /health 503 until real weights arrive);
3. push the checkpoint with `torchrun --nproc-per-node 2 -m ckpt_engine.update` (one
   parameter-server rank per server rank);
4. verify: /health 200, every /weights_info sha256 equal to the checkpoint file's own tensor,
   /generate equal to transformers' greedy output;
5. print a table: bytes, register / gather / update seconds, GB/s.

It runs on two GPUs when present (`--device cuda`), else on CPU. Every process it starts is
stopped at the end; any failure exits 1 with the cause (and the server's log).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout (or site-packages, from a wheel)
TP = 2
PROMPT = "w11 w22 w33 w44 w55"
NEW_TOKENS = 8
# About 21 MB in float32: big enough to time, small enough for a 2-core CPU.
MODEL = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    vocab_size=4096,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


class DemoError(RuntimeError):
    pass


def make_checkpoint(path: Path):
    """A random Qwen3 (float32, norms randomised too) + tokenizer.json: "w<i>" is token i."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import AutoModelForCausalLM, Qwen3Config
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**MODEL)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(MODEL["vocab_size"])}, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return model


def file_digests(path: Path) -> dict[str, str]:
    import torch
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                flat = f.get_tensor(name).contiguous().reshape(-1)
                out[name] = hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(15)


def http(method: str, url: str, **kw):
    import requests

    return requests.request(method, url, timeout=kw.pop("timeout", 60), **kw)


def wait_for_ping(url: str, server: subprocess.Popen, deadline_s: float) -> None:
    import requests

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise DemoError(f"the server exited with code {server.returncode}")
        with contextlib.suppress(requests.ConnectionError):
            if http("GET", url + "/ping", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise DemoError(f"the server did not come up within {deadline_s} s")


def run_updater(work: Path, ckpt: Path, url: str, key: str, device: str, timeout_s: float):
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, wherever torch is
    result_file = work / "update.json"
    cmd = [*torchrun, "--standalone", "--nproc-per-node", str(TP), "-m", "ckpt_engine.update"]
    cmd += ["--checkpoint-path", str(ckpt), "--endpoint", url, "--device", device]
    cmd += ["--inference-parallel-size", str(TP), "--api-key", key, "--checkpoint-name", "demo"]
    cmd += ["--inference-api", "update_weights_from_ipc", "--weight-version", "demo-1"]
    cmd += ["--result-file", str(result_file)]
    log = work / "update.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise DemoError(
            f"the updater did not finish in {timeout_s} s:\n{log.read_text()}"
        ) from None
    finally:
        kill_group(proc)
    if proc.returncode != 0:
        raise DemoError(f"the updater failed (exit {proc.returncode}):\n{log.read_text()}")
    return json.loads(result_file.read_text())


def verify(url: str, ckpt: Path, model, key: str) -> dict[str, str]:
    import torch

    health = http("GET", url + "/health")
    if health.status_code != 200:
        raise DemoError(f"/health {health.status_code} after the update: {health.text}")
    auth = {"Authorization": f"Bearer {key}"}
    info = http("GET", url + "/weights_info", headers=auth).json()
    want = file_digests(ckpt)
    served = {name: t["sha256"] for name, t in info["tensors"].items()}
    if served != want:
        bad = sorted(n for n in set(want) | set(served) if want.get(n) != served.get(n))
        raise DemoError(f"/weights_info differs from the checkpoint files: {bad[:5]}")
    body = {"text": PROMPT, "max_new_tokens": NEW_TOKENS, "sampling_params": {"ignore_eos": True}}
    out = http("POST", url + "/generate", json=body).json()
    ids = [int(w[1:]) for w in PROMPT.split()]
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    want_ids = ids[-NEW_TOKENS:]
    if out.get("output_ids") != want_ids:
        raise DemoError(f"/generate gave {out.get('output_ids')}, transformers {want_ids}")
    return {
        "tensors": f"{len(want)}/{len(want)} sha256 equal to the checkpoint files",
        "generate": f"{out['text']!r} == transformers greedy (version {out['weight_version']})",
    }


def table(result: dict, checks: dict[str, str], device: str) -> str:
    rows = [
        ("checkpoint", f"{result['bytes'] / 1e6:.1f} MB, {result['tensors']} tensors"),
        ("register", f"{result['register_s']:.3f} s"),
        ("gather", f"{result['gather_s']:.3f} s"),
        ("update", f"{result['update_s']:.3f} s"),
        ("bandwidth", f"{result['update_gb_s']:.3f} GB/s"),
        ("/health", "200"),
        ("/weights_info", checks["tensors"]),
        ("/generate", checks["generate"]),
    ]
    head = f"ckpt-engine demo: {device}, server TP={TP}, {result['ranks']} parameter-server ranks"
    return "\n".join([head] + [f"  {k:<14} {v}" for k, v in rows])


def run(device: str, work: Path, timeout_s: float) -> str:
    ckpt = work / "checkpoint"
    print(f"[demo] work folder {work}", flush=True)
    print("[demo] making a random Qwen3 checkpoint (transformers, from a config)", flush=True)
    model = make_checkpoint(ckpt)
    port, key = free_port(), secrets.token_hex(8)
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "workers.server", "--model-path", str(ckpt), "--port", str(port)]
    cmd += ["--tp", str(TP), "--device", device, "--load-format", "dummy"]
    cmd += ["--wait-for-initial-weights", "--api-key", key, "--log-level", "warning"]
    log = work / "server.log"
    print(f"[demo] starting the server (TP={TP}, dummy weights) on {url}", flush=True)
    with open(log, "wb") as out:
        server = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        try:
            wait_for_ping(url, server, timeout_s)
            status = http("GET", url + "/health")
            print(f"[demo] /health {status.status_code} {status.json()['status']}", flush=True)
            print("[demo] torchrun --nproc-per-node 2 -m ckpt_engine.update ...", flush=True)
            result = run_updater(work, ckpt, url, key, device, timeout_s)
            checks = verify(url, ckpt, model, key)
        except DemoError as e:
            raise DemoError(f"{e}\n--- server log ({log}) ---\n{log.read_text()[-4000:]}") from e
    finally:
        kill_group(server)
    return table(result, checks, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ckpt-engine-demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda with 2 GPUs present, else cpu",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per step")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args(argv)
    import torch

    device = args.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= TP else "cpu"
    work = Path(tempfile.mkdtemp(prefix="ckpt-engine-demo-"))
    start = time.monotonic()
    try:
        print(run(device, work, args.timeout))
    except (DemoError, OSError, ValueError) as e:
        print(f"ckpt-engine demo FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"[demo] logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"[demo] done in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
