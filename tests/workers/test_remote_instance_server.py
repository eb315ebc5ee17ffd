"""End to end, remote-instance fork on CPU (gloo): a TP=2 seed loaded from disk; a TP=2 client
(shard mode) and a TP=1 client (slice mode) fork from it at the same time and serve the same
weights (checksums) and tokens; a forked client serves as a seed in turn: from that TP=1 seed,
a TP=2 client in slice mode moves per rank only what it keeps (half of each sharded tensor, the
norms whole: counted in bytes) and one in full mode (--...-whole-tensors) the whole model, both
bit-exact against the checkpoint; a mismatched manifest or a wrong key is refused naming the
cause; a client killed mid-transfer leaves the seed serving; a seed killed mid-transfer makes
the client exit non-zero within its timeout."""

from __future__ import annotations

import json
import re
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from workers_testutil import (
    KEY,
    NEW_TOKENS,
    PROMPT,
    free_port,
    poll,
    skip_without_gpus,
    start_server,
    wait_until_up,
)

pytestmark = pytest.mark.slow

VERSION = "fork-v1"
GENERATE = {"input_ids": PROMPT, "max_new_tokens": NEW_TOKENS}


def start_seed(path, log, *extra, device="cpu"):
    args = ["--device", device, "--dtype", "float32", "--api-key", "secret"]
    return start_server(path, *args, "--weight-version", VERSION, *extra, log=log)


def start_client(path, seed, *, tp: int, log, extra=(), device="cpu", env=None):
    args = ["--tp", str(tp), "--device", device, "--dtype", "float32", "--api-key", "secret"]
    args += ["--load-format", "remote_instance"]
    args += ["--remote-instance-weight-loader-seed-instance-ip", "127.0.0.1"]
    args += ["--remote-instance-weight-loader-seed-instance-service-port", seed.url.split(":")[-1]]
    ports = json.dumps([free_port() for _ in range(tp)])
    args += ["--remote-instance-weight-loader-send-weights-group-ports", ports]
    return start_server(path, *args, *extra, log=log, env=env)


@pytest.fixture(scope="module")
def seed(checkpoints, tmp_path_factory):
    path, _ = checkpoints["qwen3"]
    server = start_seed(path, tmp_path_factory.mktemp("logs") / "seed.log", "--tp", "2")
    try:
        wait_until_up(server)
        yield server, path
    finally:
        server.stop()


def same_weights_and_tokens(a, b) -> None:
    info_a, info_b = (
        a.get("/weights_info", headers=KEY).json(),
        b.get("/weights_info", headers=KEY).json(),
    )
    assert info_a["tensors"] == info_b["tensors"]
    assert info_a["checksum"] == info_b["checksum"]
    assert info_b["status"] == "ready" and info_b["weight_version"] == VERSION
    out_a, out_b = a.post("/generate", GENERATE).json(), b.post("/generate", GENERATE).json()
    assert out_a["output_ids"] == out_b["output_ids"] and out_b["weight_version"] == VERSION


def forked_bytes(server, tp: int) -> list[int]:
    """Bytes each rank of a forked client received, from its log."""
    found = dict(re.findall(r"rank (\d+): forked .*; (\d+) bytes received", server.output()))
    return [int(found[str(j)]) for j in range(tp)]


def checkpoint_bytes(model) -> tuple[int, int]:
    """(all bytes, bytes of the replicated tensors: norms) of the checkpoint, as float32."""
    state = model.state_dict()
    total = sum(t.numel() * 4 for t in state.values())
    norms = sum(t.numel() * 4 for n, t in state.items() if n.endswith("norm.weight"))
    return total, norms


def same_as_checkpoint(server, model) -> None:
    """Every tensor the server holds is bit-exact the checkpoint's (served as float32)."""
    from workers.models.weights import tensor_digest

    served = server.get("/weights_info", headers=KEY).json()["tensors"]
    want = {n: tensor_digest(t.float())["sha256"] for n, t in model.state_dict().items()}
    assert {n: served[n]["sha256"] for n in want} == want


def test_two_clients_fork_at_once_then_a_client_seeds_another(seed, checkpoints, tmp_path):
    seed_server, path = seed
    _, hf_model = checkpoints["qwen3"]
    total, norms = checkpoint_bytes(hf_model)
    verify = ["--remote-instance-weight-loader-verify-checksums"]
    tp2 = start_client(path, seed_server, tp=2, log=tmp_path / "tp2.log", extra=verify)
    tp1 = start_client(path, seed_server, tp=1, log=tmp_path / "tp1.log")
    sliced = whole = None
    try:
        wait_until_up(tp2)
        wait_until_up(tp1)
        assert "shard mode" in tp2.output() and "slice mode" in tp1.output()
        assert "sha256 matches the seed's" in tp2.output()
        assert forked_bytes(tp1, 1) == [total]  # a TP=1 client keeps everything
        same_weights_and_tokens(seed_server, tp2)
        same_weights_and_tokens(seed_server, tp1)
        assert seed_server.get("/health").status_code == 200
        # A client that finished loading is a seed in its turn: TP=1 -> TP=2, in slice mode
        # (each rank receives only its rows) and in full mode (each receives everything).
        progress = {"CKPT_ENGINE_PROGRESS": "log", "CKPT_ENGINE_PROGRESS_INTERVAL_S": "1e-9"}
        sliced = start_client(path, tp1, tp=2, log=tmp_path / "sliced.log", env=progress)
        whole = start_client(
            path,
            tp1,
            tp=2,
            log=tmp_path / "whole.log",
            extra=["--remote-instance-weight-loader-whole-tensors"],
        )
        wait_until_up(sliced)
        wait_until_up(whole)
        assert "slice mode" in sliced.output() and "full mode" in whole.output()
        half = norms + (total - norms) // 2  # per rank: half of each sharded tensor, norms whole
        assert forked_bytes(sliced, 2) == [half, half]
        assert forked_bytes(whole, 2) == [total, total]
        assert half < 0.6 * total
        for client in (sliced, whole):
            same_as_checkpoint(client, hf_model)
            same_weights_and_tokens(seed_server, client)
        assert f"fork from {tp1.url}: " in sliced.output()  # progress lines of its load
        assert f"client rank 0: {half}, client rank 1: {half}" in tp1.output()  # the seed's log
        fork = {  # tp1 served two sends: /metrics counts them and their bytes
            (s.name, tuple(s.labels.values())): s.value
            for f in text_string_to_metric_families(tp1.get("/metrics").text)
            for s in f.samples
        }
        assert fork[("ckpt_engine_fork_sends_total", ("ok",))] == 2
        assert fork[("ckpt_engine_fork_sent_bytes_total", ())] == 2 * half + 2 * total
    finally:
        for server in (tp2, tp1, sliced, whole):
            if server is not None:
                server.stop()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ["--dtype", "bfloat16"],
            [
                "cannot serve this model",
                "tensor model.norm.weight: seed float32[64], client bfloat16[64]",
            ],
        ),
        (["--remote-instance-weight-loader-seed-api-key", "wrong"], ["answered 401", "API key"]),
    ],
    ids=["dtype-mismatch", "wrong-key"],
)
def test_a_refused_fork_fails_at_start_up_naming_the_cause(seed, tmp_path, extra, expected):
    seed_server, path = seed
    client = start_client(path, seed_server, tp=1, log=tmp_path / "c.log", extra=extra)
    try:
        rc = client.proc.wait(120)
    finally:
        client.stop()
    assert rc != 0
    for text in expected:
        assert text in client.output()
    assert "remote_instance weights loaded" not in client.output()
    assert seed_server.get("/health").status_code == 200


def test_killed_client_leaves_the_seed_serving_and_killed_seed_fails_the_client(
    checkpoints, tmp_path, monkeypatch
):
    path, _ = checkpoints["qwen3"]
    monkeypatch.setenv("CKPT_ENGINE_TEST_FORK_DELAY_S", "0.3")  # about 6 s per send
    slow_seed = start_seed(path, tmp_path / "slow-seed.log")
    monkeypatch.delenv("CKPT_ENGINE_TEST_FORK_DELAY_S")
    timeout = ["--remote-instance-weight-loader-timeout", "20"]
    try:
        wait_until_up(slow_seed)

        def sending(n: int):
            return lambda: slow_seed.output().count("sending (") >= n

        # A client killed mid-transfer: the send fails on the seed, which keeps serving.
        doomed = start_client(path, slow_seed, tp=1, log=tmp_path / "doomed.log", extra=timeout)
        poll(sending(1), 60, "the seed to start sending")
        doomed.stop()
        poll(lambda: "send_weights_to_remote_instance" in slow_seed.output(), 30, "send failure")
        assert slow_seed.get("/health").status_code == 200
        assert slow_seed.post("/generate", GENERATE).status_code == 200

        # The seed killed mid-transfer: the client exits non-zero, quickly, saying why.
        client = start_client(path, slow_seed, tp=1, log=tmp_path / "client.log", extra=timeout)
        poll(sending(2), 60, "the seed to start sending again")
        slow_seed.stop()
        killed = time.monotonic()
        try:
            rc = client.proc.wait(40)
        finally:
            client.stop()
        assert rc != 0
        assert time.monotonic() - killed < 25
        out = client.output()
        assert "fork from seed" in out or "seed http://127.0.0.1" in out, out
        assert "failed to start" in out
    finally:
        slow_seed.stop()


@pytest.mark.gpu
def test_fork_over_nccl_from_gpu_0_to_gpu_1(checkpoints, tmp_path, monkeypatch):
    """NCCL: a TP=1 seed on GPU 0, a TP=1 client on GPU 1 (same weights and tokens); then a
    client killed mid-transfer (the seed aborts its NCCL group and keeps serving)."""
    skip_without_gpus("cuda", 2)
    path, _ = checkpoints["qwen3"]
    monkeypatch.setenv("CKPT_ENGINE_TEST_FORK_DELAY_S", "0.2")
    # The seed's own timeout bounds how long it waits on a dead client: NCCL reports no error
    # when the peer dies, so the seed's poll sees no progress for that long, then aborts.
    seed_timeout = ["--remote-instance-weight-loader-timeout", "15"]
    seed = start_seed(path, tmp_path / "seed.log", *seed_timeout, device="cuda")
    monkeypatch.delenv("CKPT_ENGINE_TEST_FORK_DELAY_S")
    # The seed pauses 0.2 s per tensor (so the second client can be killed mid-transfer): the
    # whole send takes ~25 s, so the client's timeout must cover it.
    on_gpu1 = ["--base-gpu-id", "1", "--remote-instance-weight-loader-timeout", "90"]
    client = doomed = None
    try:
        wait_until_up(seed)
        client = start_client(
            path, seed, tp=1, log=tmp_path / "c.log", extra=on_gpu1, device="cuda"
        )
        wait_until_up(client)
        assert "shard mode" in client.output()
        same_weights_and_tokens(seed, client)
        client.stop()
        doomed = start_client(
            path, seed, tp=1, log=tmp_path / "d.log", extra=on_gpu1, device="cuda"
        )
        poll(lambda: seed.output().count("sending (") >= 2, 60, "the second send to start")
        doomed.stop()
        failed = "send_weights_to_remote_instance failed"
        poll(lambda: failed in seed.output(), 60, "the seed to give up the send")
        assert seed.get("/health").status_code == 200
        assert seed.post("/generate", GENERATE).status_code == 200
    finally:
        for server in (doomed, client, seed):
            if server is not None:
                server.stop()


@pytest.mark.gpu
def test_slice_mode_over_nccl_tp1_seed_to_tp2_client(checkpoints, tmp_path):
    """NCCL: a TP=1 seed on GPU 0, a TP=2 client on GPUs 1-2 in slice mode: each rank receives
    the norms and half of every other tensor, bit-exact against the checkpoint."""
    skip_without_gpus("cuda", 3)
    path, hf_model = checkpoints["qwen3"]
    total, norms = checkpoint_bytes(hf_model)
    seed = start_seed(path, tmp_path / "seed.log", device="cuda")
    client = None
    try:
        wait_until_up(seed)
        client = start_client(
            path, seed, tp=2, log=tmp_path / "c.log", extra=["--base-gpu-id", "1"], device="cuda"
        )
        wait_until_up(client)
        assert "slice mode" in client.output()
        half = norms + (total - norms) // 2
        assert forked_bytes(client, 2) == [half, half]
        same_as_checkpoint(client, hf_model)
        same_weights_and_tokens(seed, client)
    finally:
        for server in (client, seed):
            if server is not None:
                server.stop()


def test_an_init_with_another_slice_plan_is_refused_before_any_group(seed):
    """The seed plans slice mode itself and refuses (400) a client whose plan digest differs
    (other versions), or a record it cannot read, naming why; it keeps serving."""
    seed_server, _ = seed
    manifest = seed_server.get("/remote_instance_manifest", headers=KEY).json()
    assert set(manifest["layouts"]) >= {"model.norm.weight", "model.embed_tokens.weight"}
    body = {
        "master_address": "127.0.0.1", "ports": str(free_port()), "group_rank": 0,
        "world_size": 2, "group_name": "send_weights_test", "backend": "gloo",
    }  # fmt: skip
    wrong = {"format": 1, "tp_size": 1, "layouts": {}, "digest": "0" * 64}
    for slices, said in [
        (wrong, "the client's plan differs from this seed's"),
        ({**wrong, "format": 7}, "slices: format 7"),
        ({**wrong, "tp_size": 3}, "the client says TP size 3 but gave 1 ports"),
    ]:
        r = seed_server.post(
            "/init_weights_send_group_for_remote_instance", {**body, "slices": slices}, headers=KEY
        )
        assert r.status_code == 400 and said in r.json()["message"], r.text
    assert seed_server.get("/health").status_code == 200


def test_deeply_nested_layouts_and_ports_are_refused_naming_them(seed):
    """A hostile or buggy client: layouts stacked again and again (20 levels: past a layout's
    5; 900: past the 64 levels of any request body, and once past Python's recursion limit),
    ports nested in their JSON list: 400 naming the field, the parameter and the limit; the
    seed keeps serving."""
    seed_server, _ = seed
    body = {
        "master_address": "127.0.0.1", "ports": str(free_port()), "group_rank": 0,
        "world_size": 2, "group_name": "send_weights_test", "backend": "gloo",
    }  # fmt: skip
    init = "/init_weights_send_group_for_remote_instance"
    before = seed_server.post("/generate", GENERATE).json()["output_ids"]
    for depth, said in [
        (20, "slices.layouts['model.norm.weight']['inner']['inner']['inner']['inner']['inner']"),
        (900, "request body['slices']['layouts']['model.norm.weight']['inner']['inner']"),
    ]:
        layout: dict = {"dim": None, "parts": [[None, [8], 1]], "rank": 0, "size": 1}
        for _ in range(depth):
            layout = {"stacked": 2, "inner": layout}
        slices = {"format": 1, "tp_size": 1, "layouts": {"model.norm.weight": layout}}
        r = seed_server.post(init, {**body, "slices": {**slices, "digest": "0"}}, headers=KEY)
        assert r.status_code == 400 and said in r.json()["message"], r.text
        limit = "5 levels (a layout's JSON nests 5 at most)" if depth == 20 else "64 levels"
        assert r.json()["message"].endswith(f"nested deeper than {limit}"), r.text
    ports = "[" * 100 + "]" * 100
    r = seed_server.post(init, {**body, "ports": ports}, headers=KEY)
    assert r.status_code == 400, r.text
    said = "ports: ports[0]: JSON nested deeper than 1 level (a flat list of port numbers)"
    assert r.json()["message"] == said, r.text
    assert seed_server.get("/health").status_code == 200
    assert seed_server.post("/generate", GENERATE).json()["output_ids"] == before
