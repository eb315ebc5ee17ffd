"""``--load-format remote_instance`` in real vLLM servers (CPU build, gloo): a vLLM seed (checkpoint
A loaded from disk, our worker extension) forks new vLLM instances through ``/collective_rpc``.
Each server configuration starts once per module; the tests run in file order (the last one kills
the TP=1 seed). Each case prints its times (spawn to healthy, transfer seconds).
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
from vllm_testutil import EXTENSION, make_checkpoints, require_vllm, start_vllm
from workers_testutil import free_port, poll

# the first test also waits for the module's servers to start (several minutes on 2 busy cores)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SEED_ARGS = ("--load-format", "auto", "--worker-extension-cls", EXTENSION)
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
    started = start_together(
        tp1=(ckpts["A"].path, SEED_ARGS, dict(log=tmp / "seed-tp1.log", env=env)),
        tp2=(ckpts["A"].path, SEED_ARGS, dict(log=tmp / "seed-tp2.log", tp=2)),
    )
    try:
        for name, (server, seconds) in started.items():
            if isinstance(server, Exception):
                raise server
            print(f"\nseed {name}: healthy {seconds:.1f} s after spawn")
        started["tp1"][0].delay_file = delay_file
        yield {name: server for name, (server, _) in started.items()}
    finally:
        stop_all(started)


def fork_args(seed, tp: int, **extra) -> tuple[str, ...]:
    config = {"seed_url": seed.url, "ports": [free_port() for _ in range(tp)], "timeout": 60}
    config.update(extra)
    return ("--load-format", "remote_instance", "--model-loader-extra-config", json.dumps(config))


@pytest.fixture(scope="module")
def clients(seeds, ckpts, tmp_path_factory):
    """Started at once: a TP=1 client of the TP=1 seed located by PR #27417's environment
    variables, a TP=2 client of the TP=2 seed located by --model-loader-extra-config, and a
    client of another checkpoint (refused)."""
    tmp = tmp_path_factory.mktemp("vllm-clients")
    seed = seeds["tp1"]
    env = {
        "REMOTE_INSTANCE_IP": "127.0.0.1",
        "REMOTE_INSTANCE_SERVER_PORT": seed.url.rsplit(":", 1)[1],
        "REMOTE_INSTANCE_PORTS": str(free_port()),
    }
    by_env = ("--load-format", "remote_instance", "--model-loader-extra-config", '{"timeout": 60}')
    started = start_together(
        tp1=(ckpts["A"].path, by_env, dict(log=tmp / "client-tp1.log", env=env)),
        tp2=(ckpts["A"].path, fork_args(seeds["tp2"], 2), dict(log=tmp / "client-tp2.log", tp=2)),
        mismatch=(ckpts["wrong_shape"].path, fork_args(seed, 1), dict(log=tmp / "mismatch.log")),
    )
    for name, (server, seconds) in started.items():
        forks = [] if isinstance(server, Exception) else FORKED.findall(server.output())
        print(f"\nclient {name}: up or out {seconds:.1f} s after spawn; forks {forks}")
    try:
        yield {name: server for name, (server, _) in started.items()}
    finally:
        stop_all(started)


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
