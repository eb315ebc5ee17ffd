import pytest

from ckpt_engine import env

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}


@pytest.fixture
def torchrun_env(monkeypatch):
    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)


def test_reads_torchrun_environment(torchrun_env):
    d = env.dist_env()
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (3, 8, 1, 2)
    assert (d.master_addr, d.master_port) == ("10.0.0.1", 29500)


def test_explicit_zero_beats_environment(torchrun_env):
    d = env.dist_env(rank=0, local_rank=0)
    assert d.rank == 0 and d.local_rank == 0 and d.world_size == 8


def test_single_process_defaults(monkeypatch):
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    d = env.dist_env()
    assert (d.rank, d.world_size, d.local_rank, d.master_port) == (0, 1, 0, None)


@pytest.mark.parametrize(
    "kwargs",
    [{"rank": 2, "world_size": 2}, {"world_size": 0}, {"rank": -1}, {"master_port": 70000}],
)
def test_invalid_values_raise(monkeypatch, kwargs):
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError):
        env.dist_env(**kwargs)


def test_non_integer_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="RANK"):
        env.dist_env()


def test_device_type_knob(monkeypatch):
    monkeypatch.setenv("CKPT_ENGINE_DEVICE", "tpu")
    with pytest.raises(ValueError, match="CKPT_ENGINE_DEVICE"):
        env.device_type()
    monkeypatch.setenv("CKPT_ENGINE_DEVICE", "cpu")
    assert env.device_type() == "cpu"
