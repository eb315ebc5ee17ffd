"""``--load-format remote_instance`` in real vLLM servers (CPU build, gloo): vLLM seeds (checkpoint
A loaded from disk, our worker extension, reached through ``/collective_rpc``) fork new vLLM
instances and reference servers; a reference server forks a vLLM instance; equal TP sizes (shard
mode) and different ones (full mode: vLLM's fused qkv_proj / gate_up_proj split into checkpoint
tensors on a vLLM seed, joined by vLLM's loaders on a vLLM client). Each server configuration
starts once per module; the tests run in file order (the last two kill a client of the TP=1 vLLM
seed, then that seed, mid-send).
Each case prints its times (spawn to healthy or exit, transfer seconds).
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
from vllm_testutil import (
    EXTENSION,
    NEW_TOKENS,
    PROMPT,
    make_checkpoints,
    require_vllm,
    start_vllm,
)
from workers_testutil import free_port, poll, start_server, wait_until_up

# the first test also waits for the module's servers to start (several minutes on 2 busy cores)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SEED_ARGS = ("--load-format", "auto", "--worker-extension-cls", EXTENSION)
OURS = ("--device", "cpu", "--dtype", "float32")
OUR_FORK = re.compile(r"rank (\d): forked [\d.]+ GB from (\S+) in ([\d.]+) s .*?(\w+) mode")
UP_S = 420  # reference servers forking from a vLLM seed, on 2 busy cores
FORKED = re.compile(r"forked ([\d.]+) MB from seed (\S+) \((\w+) mode\) in ([\d.]+) s")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    require_vllm()
    return make_checkpoints(tmp_path_factory.mktemp("vllm-ckpts"))


def start_together(**specs) -> dict:
    """Start vLLM servers at once (``name=(checkpoint, args, kwargs of start_vllm)``): name ->
    (server or the exception its start raised, seconds from spawn to healthy or exit)."""
    out: dict = {}

    def run(name, checkpoint, args, kwargs):
        started = time.monotonic()
        try:
            server = start_vllm(checkpoint, *args, **kwargs)
        except Exception as e:  # reported to the test that expects this server
            e.log = kwargs["log"]  # the whole log (the message has its tail only)
            server = e
        out[name] = (server, time.monotonic() - started)

    threads = [threading.Thread(target=run, args=(n, *spec)) for n, spec in specs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def stop_all(started: dict) -> None:
    for server, _ in started.values():
        if not isinstance(server, Exception):
            server.stop()


@pytest.fixture(scope="module")
def seeds(ckpts, tmp_path_factory):
    """vLLM seeds serving A from disk, TP=1 and TP=2, started at once. The TP=1 seed's sends
    pause per tensor while its `delay_file` exists."""
    tmp = tmp_path_factory.mktemp("vllm-seeds")
    delay_file = tmp / "send-delay"
    env = {"CKPT_ENGINE_TEST_BUCKET_DELAY_FILE": str(delay_file)}
    ours = start_server(
        ckpts["A"].path, *OURS, "--tp", "2", "--api-key", "secret", log=tmp / "o.log"
    )
    started = start_together(
        tp1=(ckpts["A"].path, SEED_ARGS, dict(log=tmp / "seed-tp1.log", env=env)),
        tp2=(ckpts["A"].path, SEED_ARGS, dict(log=tmp / "seed-tp2.log", tp=2)),
    )
    try:
        for name, (server, seconds) in started.items():
            if isinstance(server, Exception):
                raise server
            print(f"\nseed {name}: healthy {seconds:.1f} s after spawn")
        wait_until_up(ours, UP_S)
        started["tp1"][0].delay_file = delay_file
        yield {"ours": ours, **{name: server for name, (server, _) in started.items()}}
    finally:
        ours.stop()
        stop_all(started)


def fork_args(seed, tp: int, **extra) -> tuple[str, ...]:
    config = {"seed_url": seed.url, "ports": [free_port() for _ in range(tp)], "timeout": 60}
    config.update(extra)
    return ("--load-format", "remote_instance", "--model-loader-extra-config", json.dumps(config))


@pytest.fixture(scope="module")
def clients(seeds, ckpts, tmp_path_factory):
    """Started at once: vLLM clients: TP=1 of the TP=1 vLLM seed located by PR #27417's
    environment variables, TP=2 of the TP=2 vLLM seed located by --model-loader-extra-config, TP=1
    of the TP=2 reference server, and one of another checkpoint (refused); reference servers: TP=1
    of the TP=2 vLLM seed, TP=2 of the TP=1 vLLM seed."""
    tmp = tmp_path_factory.mktemp("vllm-clients")
    seed = seeds["tp1"]
    env = {
        "REMOTE_INSTANCE_IP": "127.0.0.1",
        "REMOTE_INSTANCE_SERVER_PORT": seed.url.rsplit(":", 1)[1],
        "REMOTE_INSTANCE_PORTS": str(free_port()),
    }
    by_env = ("--load-format", "remote_instance", "--model-loader-extra-config", '{"timeout": 60}')
    of_ours = fork_args(seeds["ours"], 1, seed_api="ckpt-engine", api_key="secret")
    ours = {
        "ours_tp1_of_tp2": start_server(
            ckpts["A"].path, *OURS, *our_fork_args(seeds["tp2"], 1), log=tmp / "o1.log"
        ),
        "ours_tp2_of_tp1": start_server(
            ckpts["A"].path, *OURS, *our_fork_args(seed, 2), log=tmp / "o2.log"
        ),
    }
    started = start_together(
        tp1=(ckpts["A"].path, by_env, dict(log=tmp / "client-tp1.log", env=env)),
        tp2=(ckpts["A"].path, fork_args(seeds["tp2"], 2), dict(log=tmp / "client-tp2.log", tp=2)),
        mismatch=(ckpts["wrong_shape"].path, fork_args(seed, 1), dict(log=tmp / "mismatch.log")),
        tp1_of_ours=(ckpts["A"].path, of_ours, dict(log=tmp / "client-of-ours.log")),
    )
    try:
        for name, server in ours.items():
            wait_until_up(server, UP_S)
            print(f"\nreference server {name}: forks {OUR_FORK.findall(server.output())}")
        for name, (server, seconds) in started.items():
            forks = [] if isinstance(server, Exception) else FORKED.findall(server.output())
            print(f"\nclient {name}: up or out {seconds:.1f} s after spawn; forks {forks}")
        yield {**ours, **{name: server for name, (server, _) in started.items()}}
    finally:
        for server in ours.values():
            server.stop()
        stop_all(started)


def our_fork_args(seed, tp: int, timeout: int = 60) -> list[str]:
    """A reference server forking from a vLLM seed."""
    flag = "--remote-instance-weight-loader-"
    return [
        *("--tp", str(tp), "--load-format", "remote_instance", f"{flag}seed-api", "vllm"),
        *(f"{flag}seed-instance-ip", "127.0.0.1", f"{flag}timeout", str(timeout)),
        *(f"{flag}seed-instance-service-port", seed.url.rsplit(":", 1)[1]),
        *(f"{flag}send-weights-group-ports", ",".join(str(free_port()) for _ in range(tp))),
    ]


def forks(server) -> list[tuple[str, ...]]:
    if isinstance(server, Exception):
        raise server
    return FORKED.findall(server.output())


def test_vllm_seed_forks_a_vllm_client_tp1_located_by_env(seeds, clients, ckpts):
    want = ckpts["A"].greedy()
    found = forks(clients["tp1"])
    assert len(found) == 1 and found[0][1] == seeds["tp1"].url and found[0][2] == "shard", found
    assert clients["tp1"].greedy() == want
    assert seeds["tp1"].greedy() == want  # the seed still serves


def test_vllm_seed_forks_a_vllm_client_tp2(seeds, clients, ckpts):
    found = forks(clients["tp2"])
    assert len(found) == 2 and {f[2] for f in found} == {"shard"}, found
    assert clients["tp2"].greedy() == seeds["tp2"].greedy() == ckpts["A"].greedy()


def test_manifest_mismatch_is_refused_with_the_differences(seeds, clients, ckpts):
    failed = clients["mismatch"]
    assert isinstance(failed, RuntimeError), "the client of another checkpoint came up"
    assert "vLLM exited" in str(failed), failed
    out = failed.log.read_text()
    assert "ManifestMismatchError" in out, out
    assert seeds["tp1"].url in out, out
    assert "config intermediate_size: seed 128, client 96" in out, out
    assert "model.layers.0.mlp.gate_up_proj.weight" in out, out
    assert not FORKED.search(out)


def test_reference_server_seeds_a_vllm_client_of_another_tp(seeds, clients, ckpts):
    """TP=2 reference server -> TP=1 vLLM: checkpoint tensors, joined by vLLM's loaders."""
    found = forks(clients["tp1_of_ours"])
    assert len(found) == 1 and found[0][1] == seeds["ours"].url and found[0][2] == "full", found
    assert clients["tp1_of_ours"].greedy() == ckpts["A"].greedy()


@pytest.mark.parametrize(
    "client, seed, tp", [("ours_tp1_of_tp2", "tp2", 1), ("ours_tp2_of_tp1", "tp1", 2)]
)
def test_vllm_seeds_reference_servers_of_another_tp(seeds, clients, ckpts, client, seed, tp):
    """vLLM seed -> reference server: vLLM's fused parameters split into checkpoint tensors."""
    server = clients[client]
    found = OUR_FORK.findall(server.output())
    assert len(found) == tp and {(f[1], f[3]) for f in found} == {(seeds[seed].url, "full")}
    out = server.post("/generate", {"input_ids": PROMPT, "max_new_tokens": NEW_TOKENS}).json()
    assert out["output_ids"] == ckpts["A"].greedy()


def test_a_client_killed_mid_transfer_costs_the_seed_at_most_its_timeout(seeds, ckpts, tmp_path):
    """A reference server forking from the TP=1 vLLM seed with a 20 s timeout, killed once the
    seed's send began (0.5 s per tensor): the seed serves again within that timeout."""
    seed = seeds["tp1"]
    seed.delay_file.write_text("0.5")
    seen = len(seed.output())
    args = our_fork_args(seed, 1, timeout=20)
    client = start_server(ckpts["A"].path, *OURS, *args, log=tmp_path / "killed-client.log")
    try:
        poll(lambda: "test delay: fork send started" in seed.output()[seen:], 300, "the send")
    finally:
        client.stop()
        killed = time.monotonic()
        seed.delay_file.unlink()
    assert seed.greedy() == ckpts["A"].greedy()
    waited = time.monotonic() - killed
    print(f"\nseed serving again {waited:.1f} s after its client was killed")
    assert waited < 20 + 30
    assert "ckpt_engine_fork_send failed" in seed.output()[seen:]


def test_seed_killed_mid_transfer_ends_the_client_naming_the_seed(seeds, clients, ckpts, tmp_path):
    """Last test: the TP=1 seed pauses 0.5 s per tensor, and is killed once its send began."""
    seed = seeds["tp1"]
    seed.delay_file.write_text("0.5")
    seen = len(seed.output())
    outcome: dict = {}

    def run():
        outcome.update(
            start_together(c=(ckpts["A"].path, fork_args(seed, 1), dict(log=tmp_path / "c.log")))
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        poll(lambda: "test delay: fork send started" in seed.output()[seen:], 300, "the send")
    finally:
        seed.stop()
        thread.join()
    server, seconds = outcome["c"]
    print(f"\nclient of a killed seed: exited {seconds:.1f} s after spawn")
    if not isinstance(server, Exception):
        server.stop()
        pytest.fail("the client came up without its seed")
    assert "vLLM exited" in str(server), server
    out = server.log.read_text()
    assert "RemoteInstanceError" in out and seed.url in out, out
    print(next(line for line in out.splitlines() if "RemoteInstanceError:" in line)[-300:])
