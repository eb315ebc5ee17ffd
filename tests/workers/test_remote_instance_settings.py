"""Fork settings from the command line (pure): which flags each backend needs, the
`--modelexpress-config` JSON (SGLang's keys; a gRPC URL refused naming what is supported)."""

from __future__ import annotations

import json

import pytest

from workers.config import ServerArgs
from workers.errors import ConfigError

RI = ["--load-format", "remote_instance"]
SEED = [
    "--remote-instance-weight-loader-seed-instance-ip",
    "10.0.0.1",
    "--remote-instance-weight-loader-seed-instance-service-port",
    "30000",
]
MX = '{"url": "redis://:pw@r:6379/0", "model_name": "m"}'
SEED_API = ["--remote-instance-weight-loader-seed-api", "vllm"]


def backend(name):
    return ["--remote-instance-weight-loader-backend", name]


@pytest.fixture
def model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


def settings(model, *argv):
    from workers.remote_instance.settings import RemoteInstanceSettings

    args = ServerArgs(**_parse(model, argv))
    return RemoteInstanceSettings.from_server_args(args)


def _parse(model, argv):
    from workers.config import build_parser

    values = vars(build_parser().parse_args(["--model-path", model, "--device", "cpu", *argv]))
    return values


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([*RI, *backend("transfer_engine"), *SEED], ("transfer_engine", "10.0.0.1", ())),
        ([*RI, *backend("modelexpress"), "--modelexpress-config", MX], ("modelexpress", None, ())),
        (
            [*RI, *SEED, "--remote-instance-weight-loader-send-weights-group-ports", "[1234]"],
            ("gloo", "10.0.0.1", (1234,)),
        ),
    ],
)
def test_accepted(model, argv, expected):
    s = settings(model, *argv)
    assert (s.backend, s.seed_ip, s.ports) == expected


def test_modelexpress_config_parsed(model):
    s = settings(model, *RI, *backend("modelexpress"), "--modelexpress-config", MX)
    assert s.modelexpress.url == "redis://:pw@r:6379/0" and s.modelexpress.model_name == "m"
    assert not s.modelexpress.source and s.modelexpress.ttl_s == 10.0
    default = settings(
        model, *RI, *backend("modelexpress"), "--modelexpress-config", '{"url": "rediss://r:6380"}'
    )
    assert default.modelexpress.model_name == model  # as SGLang: the model path
    # a seed: no load format needed
    assert (
        settings(model, "--modelexpress-config", json.dumps({"url": "redis://r", "source": True}))
        is None
    )


@pytest.mark.parametrize(
    "argv, error",
    [
        (
            [*RI, *backend("transfer_engine")],
            "needs --remote-instance-weight-loader-seed-instance-ip",
        ),
        ([*RI, *backend("modelexpress")], "needs --modelexpress-config"),
        ([*RI, *backend("modelexpress"), *SEED, "--modelexpress-config", MX], "not used with"),
        (
            [*RI, *backend("modelexpress"), "--modelexpress-config", '{"url": "mx:8001"}'],
            "only Redis is supported",
        ),
        (
            [*RI, *backend("modelexpress"), "--modelexpress-config", '{"url": "grpc://mx:8001"}'],
            "ModelExpress gRPC server is not",
        ),
        (
            [
                *RI,
                *backend("modelexpress"),
                "--modelexpress-config",
                '{"url": "redis://r", "x": 1}',
            ],
            "unknown keys",
        ),
        ([*RI, *backend("modelexpress"), "--modelexpress-config", '{"model_name": "m"}'], '"url"'),
        (
            [
                *RI,
                *backend("modelexpress"),
                "--modelexpress-config",
                '{"url": "redis://r", "ttl_s": 1, "heartbeat_s": 2}',
            ],
            "ttl_s must exceed",
        ),
        (["--modelexpress-config", MX], 'without "source": true'),
        ([*RI, *SEED], "send-weights-group-ports"),
        ([*RI, *SEED, *backend("transfer_engine"), *SEED_API], "a vLLM seed sends over"),
        (SEED_API, "given without --load-format remote_instance"),
    ],
)
def test_refused(model, argv, error):
    with pytest.raises(ConfigError, match=error):
        settings(model, *argv)


def test_seed_publisher_follows_the_fronts_weight_changes(redis_server):
    """The seed's registry entry (real Redis): ready with its version; not ready while a weight
    update runs, then ready with the new version (republished by the front's weight listeners,
    not by the 30 s heartbeat); withdrawn on stop."""
    import time
    from types import SimpleNamespace

    from ckpt_engine.registry.redis_store import RedisRegistry
    from workers.remote_instance.coordination import ModelExpressConfig, SeedPublisher

    front = SimpleNamespace(
        state=SimpleNamespace(servable=True, version="v1"),
        changing_weights=False,
        weight_listeners=[],
    )
    config = ModelExpressConfig(
        url=redis_server.url, model_name="m", source=True, heartbeat_s=30, ttl_s=60
    )
    publisher = SeedPublisher(
        config, front=front, url="http://10.0.0.1:30000", tp_size=2, digest="sha256:x"
    )
    registry = RedisRegistry(redis_server.url)

    def entry_becomes(ready: bool, version: str):
        deadline = time.monotonic() + 10
        while True:
            (r,) = registry.sources("m")
            if (r.ready, r.weight_version) == (ready, version):
                return r
            assert time.monotonic() < deadline, r
            time.sleep(0.02)

    try:
        r = entry_becomes(True, "v1")
        assert r.instance == "10.0.0.1:30000" and r.tp_size == 2 and r.digest == "sha256:x"
        assert r.backends == {"transfer_engine": {"url": "http://10.0.0.1:30000"}}
        front.changing_weights = True
        for listener in front.weight_listeners:
            listener()
        entry_becomes(False, "v1")
        front.changing_weights, front.state.version = False, "v2"
        for listener in front.weight_listeners:
            listener()
        entry_becomes(True, "v2")
    finally:
        publisher.stop()
    assert registry.sources("m") == []


def test_seed_api_picks_the_seed_client(model):
    """--...-seed-api vllm: a reference server forks from a vLLM seed (workers.vllm.seed)."""
    from workers.remote_instance.loader import RemoteInstanceFormat
    from workers.remote_instance.seed_client import SeedClient
    from workers.vllm.seed import VllmSeedClient

    ports = ["--remote-instance-weight-loader-send-weights-group-ports", "1234"]
    ours = RemoteInstanceFormat(settings(model, *RI, *SEED, *ports))
    vllm = RemoteInstanceFormat(settings(model, *RI, *SEED, *ports, *SEED_API))
    assert type(ours.seed) is SeedClient and type(vllm.seed) is VllmSeedClient
    assert vllm.seed.url == "http://10.0.0.1:30000"
