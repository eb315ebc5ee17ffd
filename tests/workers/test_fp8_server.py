"""End to end, block-FP8 checkpoints (`python -m workers.server`, compute in bf16, TP=1 and TP=2):
a disk-loaded server serves the FP8 files' bytes and stays close to the bf16 original; a server
started with dummy weights and then updated three times (A, B, A) matches, after every update, a
fresh disk-loaded server of the same checkpoint bit for bit in /weights_info and token for token
(and logit for logit) in /generate.

The update mechanism is a parameter: `UPDATES` maps a name to `apply(server, checkpoint_dir)`:
`disk` (update_weights_from_disk) and `ipc` (the parameter server pushing the checkpoint through
`torchrun examples/update.py`).

Tolerance against the bf16 original (transformers, float32, on the bf16 weights, teacher-forced
on the server's own output): RMS error / RMS logit <= 0.2 and max error <= 0.3 * max |logit|;
measured on CPU (checkpoint A, TP=1 and TP=2): RMS ratio 0.118, max ratio 0.13, greedy tokens
6 of 6 equal to the original's along the sequence (see test_fp8.py for the spread over seeds and
families).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from fp8_testutil import bf16_model, save_fp8_checkpoint
from safetensors import safe_open
from workers_testutil import (
    KEY,
    NEW_TOKENS,
    PROMPT,
    run_updater,
    skip_without_gpus,
    start_server,
    wait_until_up,
)

pytestmark = pytest.mark.slow

RMS_REL_TOL, MAX_REL_TOL = 0.2, 0.3


def update_from_disk(server, checkpoint: Path) -> None:
    body = {"method": "update_weights_from_disk", "args": [str(checkpoint)]}
    r = server.post("/collective_rpc", body, headers=KEY)
    assert r.status_code == 200, r.text


def update_from_ipc(server, checkpoint: Path) -> None:
    """The parameter server pushes the checkpoint: torchrun examples/update.py, one rank per
    server rank (TP size and device asked of the server)."""
    ranks = server.post("/collective_rpc", {"method": "ping"}, headers=KEY).json()["results"]
    device = ranks[0]["device"].split(":")[0]
    rc, out = run_updater(server.url, checkpoint, nproc=len(ranks), device=device)
    assert rc == 0, out


UPDATES = {"disk": update_from_disk, "ipc": update_from_ipc}


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    """{"A": (folder, bf16 original), "B": ...}: two FP8 checkpoints of one shape."""
    out = {}
    for name, seed in (("A", 0), ("B", 1)):
        hf = bf16_model("qwen3", seed=seed)
        out[name] = (save_fp8_checkpoint(hf, tmp_path_factory.mktemp(f"fp8-{name}")), hf)
    return out


def _params():
    return [
        pytest.param(
            (tp, device), id=f"tp{tp}-{device}", marks=[pytest.mark.gpu] * (device == "cuda")
        )
        for device in ("cpu", "cuda")
        for tp in (1, 2)
    ]


@pytest.fixture(scope="module", params=_params())
def fleet(request, fp8_checkpoints, tmp_path_factory):
    """{"A": disk-loaded server of A, "B": of B, "dummy": dummy weights}, all started at once."""
    tp, device = request.param
    skip_without_gpus(device, tp)
    logs = tmp_path_factory.mktemp("fp8-logs")
    common = ["--tp", str(tp), "--device", device, "--api-key", "secret"]
    servers = {}
    try:
        for name in ("A", "B", "dummy"):
            path = fp8_checkpoints["A" if name == "dummy" else name][0]
            extra = ["--load-format", "dummy"] if name == "dummy" else []
            servers[name] = start_server(path, *common, *extra, log=logs / f"{name}-tp{tp}.log")
        for server in servers.values():
            wait_until_up(server)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def generate(server) -> dict:
    body = {"input_ids": PROMPT, "max_new_tokens": NEW_TOKENS, "return_logits": True}
    body["sampling_params"] = {"ignore_eos": True}
    r = server.post("/generate", body)
    assert r.status_code == 200, r.text
    return r.json()


def file_digests(folder: Path) -> dict:
    want = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                t = f.get_tensor(name).contiguous()
                digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()
                dtype = str(t.dtype).removeprefix("torch.")
                want[name] = {"dtype": dtype, "shape": list(t.shape), "sha256": digest}
    return want


def test_disk_loaded_server_serves_the_fp8_files(fleet, fp8_checkpoints):
    info = fleet["A"].get("/weights_info", headers=KEY).json()
    want = file_digests(fp8_checkpoints["A"][0])
    assert info["tensors"] == want
    assert info["tensors"]["model.layers.0.mlp.down_proj.weight"]["dtype"] == "float8_e4m3fn"
    assert info["tensors"]["model.layers.0.mlp.down_proj.weight_scale_inv"]["dtype"] == "float32"


def test_disk_loaded_server_stays_close_to_the_bf16_original(fleet, fp8_checkpoints):
    out = generate(fleet["A"])
    hf = fp8_checkpoints["A"][1]
    ids = PROMPT + out["output_ids"]
    with torch.no_grad():
        full = hf(torch.tensor([ids])).logits[0]
    want = full[len(PROMPT) - 1 : len(ids) - 1]
    got = torch.tensor(out["logits"])
    err = got - want
    assert err.pow(2).mean().sqrt() <= RMS_REL_TOL * want.pow(2).mean().sqrt()
    assert err.abs().max() <= MAX_REL_TOL * want.abs().max()
    # Greedy agreement with the original along the served sequence (measured: 6 of 6).
    agree = sum(int(torch.argmax(row)) == tok for row, tok in zip(want, out["output_ids"]))
    assert agree >= NEW_TOKENS - 1


@pytest.mark.parametrize("update", list(UPDATES))
def test_three_updates_after_dummy_match_fresh_disk_loads(fleet, fp8_checkpoints, update):
    dummy = fleet["dummy"]
    for which in ("A", "B", "A"):
        UPDATES[update](dummy, fp8_checkpoints[which][0])
        assert dummy.get("/health").status_code == 200
        got, want = (
            dummy.get("/weights_info", headers=KEY).json(),
            fleet[which].get("/weights_info", headers=KEY).json(),
        )
        assert got["tensors"] == want["tensors"] and got["checksum"] == want["checksum"]
        served, fresh = generate(dummy), generate(fleet[which])
        assert served["output_ids"] == fresh["output_ids"]
        assert served["logits"] == fresh["logits"]  # bit for bit (JSON floats round-trip)
