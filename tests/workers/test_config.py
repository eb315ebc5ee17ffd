"""ServerArgs and the command line derived from it."""

from __future__ import annotations

import dataclasses

import pytest

from workers.config import ServerArgs, build_parser
from workers.errors import ConfigError


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


def parse(model_dir, *argv):
    return ServerArgs.from_cli(["--model-path", model_dir, "--device", "cpu", *argv])


@pytest.mark.parametrize(
    "argv, field, value",
    [
        ([], "tp", 1),
        (["--tp", "2"], "tp", 2),
        (["--tp-size", "4"], "tp", 4),
        (["--wait-for-initial-weights"], "wait_for_initial_weights", True),
        (["--checkpoint-engine-wait-weights-before-ready"], "wait_for_initial_weights", True),
        (["--wait-for-initial-weights-timeout", "2.5"], "wait_for_initial_weights_timeout", 2.5),
        (["--load-format", "dummy"], "load_format", "dummy"),
        (["--dtype", "bfloat16"], "dtype", "bfloat16"),
        (["--api-key", "k"], "api_key", "k"),
        (["--host", "0.0.0.0", "--port", "8000"], "port", 8000),
        ([], "wait_for_initial_weights", False),
    ],
)
def test_cli_values(model_dir, argv, field, value):
    assert getattr(parse(model_dir, *argv), field) == value


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--wait"], "unrecognized arguments: --wait"),  # no abbreviations
        (["--tp", "0"], "--tp must be >= 1"),
        (["--tp", "two"], "invalid int value"),
        (["--load-format", "npz"], "invalid choice"),
        (["--dtype", "int8"], "invalid choice"),
        (["--port", "70000"], "--port"),
        (["--rank-timeout", "0"], "--rank-timeout must be positive"),
    ],
)
def test_cli_errors_exit_2_with_the_reason(model_dir, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(model_dir, *argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_model_path_needs_a_config(tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.json"):
        ServerArgs(model_path=str(tmp_path), device="cpu")


def test_every_field_has_a_flag_and_help():
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    for f in dataclasses.fields(ServerArgs):
        assert f.name in dests and f.metadata["help"]


def test_keyword_only_frozen_and_round_trips(model_dir):
    args = parse(model_dir, "--tp", "2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.tp = 3
    with pytest.raises(TypeError):
        ServerArgs(model_dir)  # keyword-only
    assert ServerArgs.from_dict(args.to_dict()) == args
    with pytest.raises(ConfigError, match="unknown server settings: nope"):
        ServerArgs.from_dict({**args.to_dict(), "nope": 1})


def test_env_default_for_the_api_key(model_dir, monkeypatch):
    import workers.config as config
    from workers.env import read_env

    monkeypatch.setattr(config, "ENV", read_env({"CKPT_ENGINE_API_KEY": "from-env"}))
    assert parse(model_dir).api_key == "from-env"
    assert parse(model_dir, "--api-key", "explicit").api_key == "explicit"
    monkeypatch.setattr(config, "ENV", read_env({}))
    assert parse(model_dir).api_key is None
