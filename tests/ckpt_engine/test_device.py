import pytest
import torch

from ckpt_engine import device


def test_cpu_key_scheme(monkeypatch):
    monkeypatch.setenv("CKPT_ENGINE_HOSTNAME", "node7")
    assert device.device_key(3, device_type="cpu") == "CPU-node7-3"
    assert device.device_key(device_type="cpu") == "CPU-node7-0"


def test_cpu_key_defaults_to_hostname(monkeypatch):
    import socket

    monkeypatch.delenv("CKPT_ENGINE_HOSTNAME", raising=False)
    assert device.device_key(1, device_type="cpu") == f"CPU-{socket.gethostname()}-1"


def test_resolve_rejects_unknown_type():
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        device.resolve_device_type("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_requested_without_gpu():
    with pytest.raises(ValueError, match="no CUDA device"):
        device.resolve_device_type("cuda")


def test_free_bytes_cpu_is_shm_space():
    assert device.free_bytes("cpu", 0) > 0


@pytest.mark.gpu
def test_gpu_key_matches_torch_uuid():
    key = device.device_key(0, device_type="cuda")
    assert key == f"GPU-{torch.cuda.get_device_properties(0).uuid}"
    assert key.startswith("GPU-") and len(key) > 20
