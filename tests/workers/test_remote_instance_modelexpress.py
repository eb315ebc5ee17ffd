"""End to end on CPU, real Redis (a redis-server on a free port) and real Mooncake (TCP): the
`modelexpress` backend. Clients carry no seed address: they wait for a ready seed in the
registry. Start order (client first), discovery, a wrong Redis password refused clearly; a
seed killed mid-transfer with a second seed present (the client moves to it), its heartbeat
expiring, and the killed seed restarted (it republishes and serves the next client)."""

from __future__ import annotations

import json
import os
import signal

import pytest
from redis_testutil import start_redis
from test_remote_instance_server import VERSION, same_weights_and_tokens, start_seed
from test_remote_instance_te import TE_ENV
from workers_testutil import poll, start_server, wait_until_up

from ckpt_engine.registry.redis_store import RedisRegistry

pytestmark = pytest.mark.slow

MODEL = "qwen3-tiny"


def mx(url: str, **extra) -> str:
    return json.dumps({"url": url, "model_name": MODEL, **extra})


def start_mx_seed(path, redis_url, log, *extra, instance=None):
    config = mx(redis_url, source=True, heartbeat_s=0.5, ttl_s=3, instance_id=instance)
    return start_seed(path, log, "--modelexpress-config", config, *extra)


def start_mx_client(path, redis_url, log, *, tp=1, env=None, timeout=120):
    args = ["--tp", str(tp), "--device", "cpu", "--dtype", "float32", "--api-key", "secret"]
    args += ["--load-format", "remote_instance"]
    args += ["--remote-instance-weight-loader-backend", "modelexpress"]
    args += ["--modelexpress-config", mx(redis_url)]
    args += ["--remote-instance-weight-loader-timeout", str(timeout)]
    return start_server(path, *args, log=log, env={**TE_ENV, **(env or {})})


def test_client_first_then_seed_found_in_the_registry(checkpoints, tmp_path, monkeypatch):
    path, _ = checkpoints["qwen3"]
    monkeypatch.setenv("CKPT_ENGINE_MOONCAKE_PROTOCOL", "tcp")
    redis_server = start_redis(tmp_path / "redis", password="s3cret-pw")
    try:
        client = start_mx_client(path, redis_server.url, tmp_path / "client.log", tp=2)
        wrong = start_mx_client(
            path, redis_server.url_with("wrong-password"), tmp_path / "wrong.log", timeout=30
        )
        seed = None
        try:
            poll(lambda: "waiting up to" in client.output(), 120, "the client to wait for a seed")
            seed = start_mx_seed(path, redis_server.url, tmp_path / "seed.log", "--tp", "2")
            wait_until_up(seed)
            wait_until_up(client, deadline_s=180)
            assert "found in the registry" in client.output()
            same_weights_and_tokens(seed, client)
            (record,) = RedisRegistry(redis_server.url).sources(MODEL)
            assert record.ready and record.tp_size == 2 and record.weight_version == VERSION
            assert record.backends["transfer_engine"]["url"] == seed.url
            assert wrong.proc.wait(120) != 0
            assert "refused the credentials" in wrong.output()
            assert "wrong-password" not in wrong.output()
        finally:
            for server in (client, wrong, seed):
                if server is not None:
                    server.stop()
        # a seed that stops withdraws its entry
        assert RedisRegistry(redis_server.url).sources(MODEL) == []
    finally:
        redis_server.stop()


def test_seed_killed_mid_transfer_then_restarted(checkpoints, tmp_path, redis_server, monkeypatch):
    path, _ = checkpoints["qwen3"]
    monkeypatch.setenv("CKPT_ENGINE_MOONCAKE_PROTOCOL", "tcp")
    seeds = {
        name: start_mx_seed(path, redis_server.url, tmp_path / f"{name}.log", instance=name)
        for name in ("A", "B")
    }
    registry = RedisRegistry(redis_server.url)
    client = later = None
    try:
        for seed in seeds.values():
            wait_until_up(seed)
        poll(
            lambda: len([r for r in registry.sources(MODEL) if r.ready]) == 2, 30, "two ready seeds"
        )
        # The client pauses after each parameter it reads: a window to kill its seed.
        client = start_mx_client(
            path,
            redis_server.url,
            tmp_path / "client.log",
            env={"CKPT_ENGINE_TEST_READ_DELAY_S": "0.3"},
        )
        urls = {name: seed.url for name, seed in seeds.items()}
        first = poll(
            lambda: next(
                (n for n, u in urls.items() if f"range(s) from {u} " in client.output()), None
            ),
            120,
            "the client to start reading from a seed",
        )
        other = "B" if first == "A" else "A"
        os.killpg(seeds[first].proc.pid, signal.SIGKILL)  # dies without withdrawing its entry
        seeds[first].proc.wait(30)
        wait_until_up(client, deadline_s=180)
        out = client.output()
        assert f"forking from {other} " in out, out
        assert f"reading from {first} failed" in out, out
        assert "/remote_instance_manifest" not in out.split(f"reading from {first} failed")[1][:200]
        same_weights_and_tokens(seeds[other], client)
        # Its heartbeat stops: the dead seed's entry expires (ttl 3 s).
        poll(lambda: first not in {r.instance for r in registry.sources(MODEL)}, 30, "expiry")
        # Restarted under the same instance id, it republishes; with the other seed gone, the
        # next client forks from it.
        seeds[first] = start_mx_seed(
            path, redis_server.url, tmp_path / f"{first}-2.log", instance=first
        )
        wait_until_up(seeds[first])
        seeds[other].stop()  # withdraws its entry
        poll(
            lambda: [r.instance for r in registry.sources(MODEL) if r.ready] == [first],
            30,
            "the restarted seed to republish",
        )
        later = start_mx_client(path, redis_server.url, tmp_path / "later.log")
        wait_until_up(later, deadline_s=180)
        assert f"forking from {first} " in later.output()
        same_weights_and_tokens(seeds[first], later)
    finally:
        for server in (client, later, *seeds.values()):
            if server is not None:
                server.stop()
