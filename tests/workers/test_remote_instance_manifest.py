"""Remote-instance fork, pure logic: the manifest record and its diff, the send plan, the
backend registry, and the start-up validation of the client's flags."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers.config import ServerArgs
from workers.distributed import TensorParallel
from workers.errors import ConfigError
from workers.models import ModelConfig, build_model
from workers.remote_instance.backend import TRANSFER_BACKENDS, get_backend
from workers.remote_instance.manifest import Manifest, TensorSpec, build_manifest
from workers.remote_instance.plan import FULL, SHARD, clients_of, fork_mode, parse_ports

QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 512,
    "hidden_act": "silu",
}


def manifest(tp_rank=0, tp_size=1, dtype=torch.float32, **overrides) -> Manifest:
    config = ModelConfig.from_dict({**QWEN3, **overrides})
    tp = TensorParallel(rank=tp_rank, size=tp_size)
    return build_manifest(build_model(config, tp=tp, dtype=dtype, device=torch.device("cpu")))


def test_manifest_lists_checkpoint_tensors_independent_of_tp():
    one, two = manifest(), manifest(tp_rank=1, tp_size=2)
    assert one.tensors == two.tensors  # checkpoint layout: full shapes, unfused names
    names = [t.name for t in one.tensors]
    assert "model.layers.0.self_attn.q_proj.weight" in names and len(set(names)) == len(names)
    assert dict(one.tensors[0].__dict__)["shape"] == (256, 64)  # embed_tokens first
    assert one.parameters != two.parameters  # the per-rank layout differs
    assert one.mismatches(two) == [] and two.mismatches(one) == []
    assert one.total_bytes == sum(t.nbytes for t in one.tensors)
    assert any(b.name.endswith("inv_freq") for b in one.buffers)


def test_manifest_round_trips_through_json():
    m = dataclasses.replace(manifest(tp_size=2), weight_version="v3")
    again = Manifest.from_json(m.to_json())
    assert again == m


@pytest.mark.parametrize(
    "client, expected",
    [
        (
            dict(dtype=torch.bfloat16),
            "tensor model.norm.weight: seed float32[64], client bfloat16[64]",
        ),
        (dict(rope_theta=50000.0), "config rope.theta: seed 10000.0, client 50000.0"),
        (
            dict(num_hidden_layers=3),
            "tensor model.layers.2.mlp.down_proj.weight: only on the client",
        ),
        (dict(num_hidden_layers=1), "tensor model.layers.1.mlp.down_proj.weight: only on the seed"),
        (
            dict(intermediate_size=256),
            "tensor model.layers.0.mlp.up_proj.weight: seed float32[128, 64], client float32[256, 64]",
        ),
    ],
    ids=["dtype", "config", "extra-layer", "missing-layer", "shape"],
)
def test_mismatches_name_every_difference(client, expected):
    dtype = client.pop("dtype", torch.float32)
    problems = manifest().mismatches(manifest(dtype=dtype, **client))
    assert expected in problems, problems


def test_buffers_are_compared():
    seed = manifest()
    other = dataclasses.replace(seed, buffers=(*seed.buffers, TensorSpec("extra", "float32", (2,))))
    assert seed.mismatches(other) == ["buffer extra: only on the client"]


def test_buffers_are_not_compared_with_a_manifest_that_lists_none():
    """A vLLM manifest lists no buffers (vLLM rebuilds its derived state itself)."""
    seed = manifest()
    assert seed.buffers
    assert seed.mismatches(dataclasses.replace(seed, buffers=())) == []
    assert dataclasses.replace(seed, buffers=()).mismatches(seed) == []


def test_malformed_manifest_is_a_protocol_error():
    from workers.errors import ProtocolError

    with pytest.raises(ProtocolError, match="malformed manifest"):
        Manifest.from_json({"tensors": []})


@pytest.mark.parametrize(
    "seed_tp, client_tp, mode, plan",
    [
        (2, 2, SHARD, [[0], [1]]),
        (2, 1, FULL, [[0], []]),
        (1, 2, FULL, [[0, 1]]),
        (2, 4, FULL, [[0, 1], [2, 3]]),  # the seed rank holding each client's rows
        (4, 2, FULL, [[0], [1], [], []]),
        (2, 3, FULL, [[0, 2], [1]]),
    ],
)
def test_plan(seed_tp, client_tp, mode, plan):
    assert fork_mode(seed_tp, client_tp) == mode
    assert [clients_of(r, seed_tp, client_tp) for r in range(seed_tp)] == plan


@pytest.mark.parametrize(
    "value, ports",
    [("[30001, 30002]", (30001, 30002)), ("30001,30002", (30001, 30002)), ([5], (5,))],
)
def test_parse_ports(value, ports):
    assert parse_ports(value) == ports


@pytest.mark.parametrize(
    "value, message",
    [
        ("[1, 1]", "repeat"),
        ("[0]", "out of"),
        ("[1,", "not a JSON list"),
        ("a,b", "integers"),
        ("", "no ports"),
        ("[[30001]]", r"ports\[0\]: JSON nested deeper than 1 level \(a flat list"),
        ("[" * 20_000 + "]" * 20_000, "ports: JSON nested deeper than 1 level"),
    ],
)
def test_parse_ports_errors(value, message):
    with pytest.raises(ValueError, match=message):
        parse_ports(value)


def test_unknown_backend_lists_the_supported_ones():
    assert set(TRANSFER_BACKENDS) >= {"nccl", "gloo"}
    with pytest.raises(ConfigError, match="supported: nccl, gloo"):
        get_backend("rdma")


# ---- start-up validation of the client's flags ------------------------------------------

FORK = "--load-format remote_instance"
SEED = "--remote-instance-weight-loader-seed-instance-ip 10.0.0.1 "
SEED += "--remote-instance-weight-loader-seed-instance-service-port 30000"
PORTS = "--remote-instance-weight-loader-send-weights-group-ports"


def parse(tmp_path, argv: str) -> ServerArgs:
    (tmp_path / "config.json").write_text("{}")
    return ServerArgs.from_cli(["--model-path", str(tmp_path), "--device", "cpu", *argv.split()])


def test_fork_flags_parse(tmp_path):
    args = parse(tmp_path, f"{FORK} {SEED} {PORTS} [31001,31002] --tp 2 --api-key k")
    from workers.remote_instance.settings import RemoteInstanceSettings

    s = RemoteInstanceSettings.from_server_args(args)
    assert (s.seed_ip, s.seed_port, s.ports) == ("10.0.0.1", 30000, (31001, 31002))
    assert s.backend == "gloo" and s.api_key == "k"  # defaults: gloo on cpu, own --api-key


@pytest.mark.parametrize(
    "argv, message",
    [
        (f"{FORK}", "needs --remote-instance-weight-loader-seed-instance-ip"),
        (f"{FORK} {SEED}", "needs --remote-instance-weight-loader-send-weights-group-ports"),
        (f"{FORK} {SEED} {PORTS} [1,2] --tp 1", "gives 2 port(s); --tp 1 needs one per TP rank"),
        (f"{FORK} {SEED} {PORTS} [1,1] --tp 2", "repeat"),
        (
            f"{FORK} {SEED} {PORTS} [1] --remote-instance-weight-loader-backend nccl",
            "moves cuda tensors; this server runs on --device cpu (use gloo)",
        ),
        (
            f"{FORK} {SEED} {PORTS} [1] --remote-instance-weight-loader-backend rdma",
            "invalid choice",
        ),
        (f"{SEED}", "given without --load-format remote_instance"),
        ("--remote-instance-weight-loader-verify-checksums", "given without --load-format"),
        (f"{FORK} {SEED} {PORTS} [1] --remote-instance-weight-loader-timeout 0", "positive"),
    ],
)
def test_missing_or_inconsistent_fork_flags_are_start_up_errors(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(tmp_path, argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
