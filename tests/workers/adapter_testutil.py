"""A one-rank CPU parameter server for the adapter tests (the worker runs in req_func)."""

from __future__ import annotations

import torch

from ckpt_engine import ParameterServer, PSConfig


def start_ps(tmp_path, monkeypatch) -> ParameterServer:
    """World size 1 on CPU, 4 KiB buckets; the caller closes it."""
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("CKPT_ENGINE_SHM_DIR", str(shm))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    return ParameterServer(
        rank=0,
        world_size=1,
        device_type="cpu",
        config=PSConfig(bucket_bytes=4096, timeout_s=10.0, connect_poll_s=0.1),
    )


def checkpoint() -> dict[str, torch.Tensor]:
    """Several buckets of 4 KiB: every tensor is checked byte for byte after the update."""
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(32, 48, generator=gen),
        "model.norm.weight": torch.randn(48, generator=gen).to(torch.bfloat16),
        **{f"model.layers.{i}.w": torch.randn(16, 16, generator=gen) for i in range(6)},
    }


class FakeModel(torch.nn.Module):
    """`load_weights(weights)` as vLLM / SGLang models have it: copies what it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.received: dict[str, torch.Tensor] = {}
        self.calls = 0

    def load_weights(self, weights):
        self.calls += 1
        for name, tensor in weights:
            assert name not in self.received, f"{name} twice"
            self.received[name] = tensor.clone()
        return set(self.received)
