"""End to end on CPU, real Mooncake over its TCP protocol: the `transfer_engine` fork backend.
A TP=2 seed registers its parameters once; a TP=2 client (equal TP: whole parameters) and a
TP=1 client (different TP: the rows it keeps) read them one-sided at the same time while the
seed keeps answering /generate; both serve the seed's weights (checksums) and tokens. The info
endpoint answers SGLang's one-rank shape; a weight update on the seed changes its generation,
and one that lands while a client reads makes that client read again; a seed without the flag
refuses clearly."""

from __future__ import annotations

import threading

import pytest
from test_remote_instance_server import GENERATE, VERSION, same_weights_and_tokens, start_seed
from workers_testutil import poll, start_server, wait_until_up

pytestmark = pytest.mark.slow

TE_SEED = "--remote-instance-weight-loader-start-seed-via-transfer-engine"
TE_ENV = {"CKPT_ENGINE_MOONCAKE_PROTOCOL": "tcp"}  # the CI machine has no RDMA device
INFO = "/get_remote_instance_transfer_engine_info"
KEY = {"Authorization": "Bearer secret"}


def start_te_client(path, seed, *, tp: int, log, extra=(), env=None):
    args = ["--tp", str(tp), "--device", "cpu", "--dtype", "float32", "--api-key", "secret"]
    args += ["--load-format", "remote_instance"]
    args += ["--remote-instance-weight-loader-backend", "transfer_engine"]
    args += ["--remote-instance-weight-loader-seed-instance-ip", "127.0.0.1"]
    args += ["--remote-instance-weight-loader-seed-instance-service-port", seed.url.split(":")[-1]]
    return start_server(path, *args, *extra, log=log, env={**TE_ENV, **(env or {})})


def test_transfer_engine_fork_equal_and_different_tp_at_once(checkpoints, tmp_path, monkeypatch):
    path, _ = checkpoints["qwen3"]
    monkeypatch.setenv("CKPT_ENGINE_MOONCAKE_PROTOCOL", "tcp")
    seed = start_seed(path, tmp_path / "seed.log", "--tp", "2", TE_SEED)
    plain = start_seed(path, tmp_path / "plain.log")
    clients = []
    try:
        wait_until_up(seed)
        info = seed.get(INFO + "?rank=1", headers=KEY).json()
        session, weights = info["remote_instance_transfer_engine_info"]  # SGLang's shape
        assert info["rank"] == 1 and info["tp_size"] == 2 and session.startswith("127.0.0.1:")
        ptr, numel, size = weights["model.norm.weight"]
        assert ptr > 0 and numel == 64 and size == 4
        assert seed.get(INFO, headers={"Authorization": "Bearer wrong"}).status_code == 401

        stop = threading.Event()
        answered = []

        def keep_asking():  # the seed serves while clients read it
            while not stop.is_set():
                answered.append(seed.post("/generate", GENERATE).status_code)

        asker = threading.Thread(target=keep_asking, daemon=True)
        asker.start()
        verify = ["--remote-instance-weight-loader-verify-checksums"]
        clients = [
            start_te_client(path, seed, tp=2, log=tmp_path / "tp2.log", extra=verify),
            start_te_client(path, seed, tp=1, log=tmp_path / "tp1.log"),
        ]
        for client in clients:
            wait_until_up(client)
        stop.set()
        asker.join(60)
        assert answered and set(answered) == {200}
        for client in clients:
            assert "one-sided (transfer_engine)" in client.output()
            same_weights_and_tokens(seed, client)
        assert "sha256 matches the seed's" in clients[0].output()

        # A weight update on the seed changes the generation clients check after reading.
        before = seed.get(INFO, headers=KEY).json()["generation"]
        body = {"method": "update_weights_from_disk", "args": [], "kwargs": {}}
        assert seed.post("/collective_rpc", body, headers=KEY).status_code == 200
        assert seed.get(INFO, headers=KEY).json()["generation"] > before
        assert seed.get(INFO, headers=KEY).json()["weight_version"] == VERSION

        # An update landing while a client reads: the client reads again, then serves.
        slow = start_te_client(
            path,
            seed,
            tp=1,
            log=tmp_path / "slow.log",
            env={"CKPT_ENGINE_TEST_READ_DELAY_S": "0.2"},
        )
        clients.append(slow)
        poll(lambda: "range(s) from" in slow.output(), 120, "the client to start reading")
        assert seed.post("/collective_rpc", body, headers=KEY).status_code == 200
        wait_until_up(slow, deadline_s=180)
        assert "changed its weights during the read (attempt 1 of 3)" in slow.output()
        assert "attempt 2)" in slow.output()
        same_weights_and_tokens(seed, slow)

        # A seed started without the flag says how to start it.
        wait_until_up(plain)
        refused = plain.get(INFO, headers=KEY)
        assert refused.status_code == 400
        assert "--remote-instance-weight-loader-start-seed-via-transfer-engine" in refused.text
    finally:
        for server in (*clients, seed, plain):
            server.stop()
