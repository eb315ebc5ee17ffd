"""End to end: `torchrun --nproc-per-node 2 examples/update.py` pushes checkpoints into a
reference server (`--tp 2 --load-format dummy --wait-for-initial-weights`).

The tests run in file order on one module-scoped server (each states the weights it starts
from): the first update makes it healthy with the weights of a disk-loaded server and
transformers' greedy output; a second update (under concurrent generation) switches it to another
checkpoint; an update that does not fit is refused before any write (the server serves on); an
update failing after bytes were written makes the server refuse to serve until a good one lands;
B then A registered and pushed in one pass (`--register-mode overlap`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from workers_testutil import (
    KEY,
    NEW_TOKENS,
    PROMPT,
    hf_greedy,
    make_hf_model,
    run_updater,
    save_checkpoint,
    skip_without_gpus,
    start_server,
    wait_until_up,
)

pytestmark = pytest.mark.slow


def push(server, checkpoint: Path, *extra: str, device: str, env: dict | None = None):
    """The updater (2 ranks, one instance) into `server`: (returncode, output)."""
    return run_updater(server.url, checkpoint, *extra, nproc=2, device=device, env=env)


def generate(server) -> dict:
    body = {"input_ids": PROMPT, "max_new_tokens": NEW_TOKENS}
    body["sampling_params"] = {"ignore_eos": True}
    r = server.post("/generate", body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{"A": (folder, hf model), "B": ..., "bad": a model whose MLP does not fit}."""
    out = {}
    for name, seed, extra in (("A", 0, {}), ("B", 1, {}), ("bad", 2, {"intermediate_size": 96})):
        model = make_hf_model("qwen3", seed=seed, **extra)
        path = save_checkpoint(model, tmp_path_factory.mktemp(f"ckpt-{name}"), tokenizer=True)
        out[name] = (path, model)
    return out


@pytest.fixture(
    scope="module",
    params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)],
)
def fleet(request, ckpts, tmp_path_factory):
    """{"target": dummy weights waiting for an update, "disk": A loaded from disk, ...}."""
    device = request.param
    skip_without_gpus(device, 2)
    tmp = tmp_path_factory.mktemp(f"e2e-{device}")
    fail_file = tmp / "fail-at-bucket"
    common = ["--tp", "2", "--device", device, "--api-key", "secret"]
    env = {"CKPT_ENGINE_TEST_FAIL_UPDATE_FILE": str(fail_file)}
    dummy = ["--load-format", "dummy", "--wait-for-initial-weights"]
    servers = {
        "target": start_server(ckpts["A"][0], *common, *dummy, log=tmp / "target.log", env=env),
        "disk": start_server(ckpts["A"][0], *common, log=tmp / "disk.log", env=env),
    }
    try:
        for server in servers.values():
            wait_until_up(server)
        yield {**servers, "device": device, "fail_file": fail_file}
    finally:
        for server in servers.values():
            server.stop()


def test_first_update_serves_the_checkpoint(fleet, ckpts):
    target, disk, device = fleet["target"], fleet["disk"], fleet["device"]
    assert target.get("/health").status_code == 503  # dummy weights are never served

    rc, out = push(target, ckpts["A"][0], device=device)
    assert rc == 0, out
    assert "register" in out and "gather" in out and "GB/s" in out

    assert target.get("/health").status_code == 200
    got, want = (
        target.get("/weights_info", headers=KEY).json(),
        disk.get("/weights_info", headers=KEY).json(),
    )
    assert got["status"] == "ready"
    assert got["tensors"] == want["tensors"] and got["checksum"] == want["checksum"]
    hf_ids, _ = hf_greedy(ckpts["A"][1], PROMPT, NEW_TOKENS)
    assert generate(target)["output_ids"] == hf_ids == generate(disk)["output_ids"]


def test_second_update_switches_checkpoints_under_concurrent_generation(fleet, ckpts):
    target, device = fleet["target"], fleet["device"]
    rc, out = push(target, ckpts["A"][0], device=device)  # start from A
    assert rc == 0, out
    before = target.get("/weights_info", headers=KEY).json()["weight_version"]
    expected = {
        before: hf_greedy(ckpts["A"][1], PROMPT, NEW_TOKENS)[0],
        "B": hf_greedy(ckpts["B"][1], PROMPT, NEW_TOKENS)[0],
    }
    results, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            body = {"input_ids": PROMPT, "max_new_tokens": NEW_TOKENS}
            body["sampling_params"] = {"ignore_eos": True}
            r = target.post("/generate", body)
            results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        rc, out = push(
            target,
            ckpts["B"][0],
            "--inference-api",
            "update_weights_from_ipc",
            "--weight-version",
            "B",
            device=device,
        )
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert rc == 0, out
    assert results and all(status == 200 for status, _ in results), results[:3]
    for _, body in results:  # each request ran on one version: old or new, never a mix
        assert body["weight_version"] in expected
        assert body["output_ids"] == expected[body["weight_version"]]
    info = target.get("/weights_info", headers=KEY).json()
    assert info["weight_version"] == "B" and info["status"] == "ready"
    assert generate(target)["output_ids"] == expected["B"] != expected[before]


def test_update_that_does_not_fit_is_refused_and_the_server_serves_on(fleet, ckpts):
    target, device = fleet["target"], fleet["device"]
    before = target.get("/weights_info", headers=KEY).json()
    assert before["status"] == "ready"
    served = generate(target)

    rc, out = push(target, ckpts["bad"][0], device=device)
    assert rc != 0 and "does not fit the model" in out, out

    assert target.get("/health").status_code == 200
    after = target.get("/weights_info", headers=KEY).json()
    assert after["status"] == "ready" and after["weight_version"] == before["weight_version"]
    assert after["checksum"] == before["checksum"]
    assert generate(target)["output_ids"] == served["output_ids"]


def test_update_failing_midway_fails_closed_until_a_good_update(fleet, ckpts):
    target, disk, device = fleet["target"], fleet["disk"], fleet["device"]
    version = target.get("/weights_info", headers=KEY).json()["weight_version"]
    small_buckets = {"CKPT_ENGINE_BUCKET_BYTES": "65536"}  # several buckets: fail in the 2nd
    fleet["fail_file"].write_text("1")
    try:
        rc, out = push(target, ckpts["A"][0], device=device, env=small_buckets)
    finally:
        fleet["fail_file"].unlink()
    assert rc != 0 and "injected failure in bucket 1" in out, out

    health = target.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "weights_inconsistent"
    assert target.post("/generate", {"input_ids": PROMPT}).status_code == 503
    info = target.get("/weights_info", headers=KEY).json()
    assert info["status"] == "weights_inconsistent" and info["weight_version"] == version
    assert "last committed weight version" in info["detail"]

    rc, out = push(target, ckpts["A"][0], device=device, env=small_buckets)
    assert rc == 0, out
    assert target.get("/health").status_code == 200
    got, want = (
        target.get("/weights_info", headers=KEY).json(),
        disk.get("/weights_info", headers=KEY).json(),
    )
    assert got["status"] == "ready" and got["checksum"] == want["checksum"]
    assert generate(target)["output_ids"] == generate(disk)["output_ids"]


def test_one_pass_register_and_update(fleet, ckpts):
    """--register-mode overlap: files read while the buckets already read move (small buckets,
    many of them), the same weights as a disk-loaded server."""
    target, disk, device = fleet["target"], fleet["disk"], fleet["device"]
    small_buckets = {"CKPT_ENGINE_BUCKET_BYTES": "65536"}
    for name in ("B", "A"):
        rc, out = push(
            target, ckpts[name][0], "--register-mode", "overlap", device=device, env=small_buckets
        )
        assert rc == 0, out
        assert "register 0.000 s" in out and "GB/s" in out
    got, want = (
        target.get("/weights_info", headers=KEY).json(),
        disk.get("/weights_info", headers=KEY).json(),
    )
    assert got["status"] == "ready" and got["checksum"] == want["checksum"]
    assert generate(target)["output_ids"] == generate(disk)["output_ids"]
