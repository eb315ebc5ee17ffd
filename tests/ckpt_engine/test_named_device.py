"""The trainer pattern: weights in the trainer's own memory (on GPU: a gathered FSDP or Megatron
shard) pushed every step with ``register_and_update(name, req_func, named_tensors=weights)``,
the previous step unregistered first, so its pinned buffers serve the next step (host memory:
one checkpoint).

Contiguous tensors on the server's device are read by the update where they are, their host
copy made beside it (ckpt_engine.ps.direct; tests/ckpt_engine/test_direct.py); strided ones,
on either device, are copied into the pool's pinned buffers first by
``ckpt_engine.ps.named.copy_into`` (device-to-host straight into pinned memory, one stream
synchronization per device), so the CPU run covers that function too. The colocated worker is a
spawned process (CUDA IPC needs a second process) that answers the sha256 of every tensor it
received; world size 1."""

from __future__ import annotations

import hashlib
import multiprocessing as mp

import pytest
import torch

from ckpt_engine import ParameterServer, PSConfig
from ckpt_engine.ps import named as named_mod

STEPS = 3


def digest(t: torch.Tensor) -> list:
    flat = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return [str(t.dtype), list(t.shape), hashlib.sha256(flat.numpy()).hexdigest()]


def worker(conn, index: int) -> None:
    """Apply each update it is sent the address of; answer {name: digest} (or the error)."""
    import zmq

    from ckpt_engine import update_weights_from_ipc

    ctx = zmq.Context()
    while conn.poll(120):
        address = conn.recv()
        if address is None:
            break
        got: dict = {}
        try:
            update_weights_from_ipc(
                ctx,
                address,
                index,
                run=lambda ws, got=got: got.update((n, digest(t)) for n, t in ws),
            )
            conn.send({"digests": got})
        except Exception as e:
            conn.send({"error": f"{type(e).__name__}: {e}"})
    ctx.term()


def trainer_weights(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(64 * 96 + 500, generator=g).to(device)
    mat = torch.randn(96, 64, generator=g).to(device)
    return {
        "embed": torch.randn(300, 64, generator=g).to(device=device, dtype=torch.bfloat16),
        "w_t": mat.t(),  # strided: made contiguous on its device, then copied
        "w_rows": mat[::3],  # strided
        "flat_view": flat[500:].view(64, 96),  # a view at a storage offset
        "half": torch.randn(77, generator=g).to(device=device, dtype=torch.float16),
        "ints": torch.randint(-100, 100, (1000,), generator=g, dtype=torch.int8).to(device),
        "mask": (torch.rand(33, generator=g) > 0.5).to(device),
        "scalar": torch.tensor(3.5, dtype=torch.float64, device=device),
    }


def train_step(weights: dict[str, torch.Tensor]) -> None:
    """New values in place, as an optimizer step (on the device's current stream)."""
    with torch.no_grad():
        for name, t in weights.items():
            if t.dtype == torch.bool:
                t.logical_not_()
            elif name != "w_rows":  # a view of w_t's storage: changed with it
                t.add_(1)


@pytest.fixture
def env(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("CKPT_ENGINE_SHM_DIR", str(shm))
    monkeypatch.delenv("MASTER_PORT", raising=False)


@pytest.mark.parametrize(
    "device",
    [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)],
)
def test_trainer_weights_every_step_bit_exact_pool_reused(device, env, monkeypatch):
    copies = []
    real = named_mod.copy_into
    monkeypatch.setattr(
        named_mod, "copy_into", lambda dst, t: copies.append(t.device.type) or real(dst, t)
    )
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=worker, args=(there, 0), daemon=True)
    proc.start()
    config = PSConfig(timeout_s=60.0, connect_poll_s=0.1)
    ps = ParameterServer(rank=0, world_size=1, device_type=device, config=config)
    weights = trainer_weights(device)
    try:
        for step in range(STEPS):
            train_step(weights)
            want = {n: digest(t) for n, t in weights.items()}
            if step:  # its pinned buffers serve this step
                ps.unregister_checkpoint(f"step{step - 1}")
            ps.register_and_update(
                f"step{step}", lambda paths: here.send(paths[0][1]), named_tensors=weights
            )
            assert here.poll(60), "the worker did not answer"
            reply = here.recv()
            assert reply.get("digests") == want, reply.get("error")
            ckpt = ps.checkpoint(f"step{step}")
            assert all(b.pinned for b in ckpt.buffers) == (device == "cuda")
            if step == 0:
                first = ps.host_pool.allocated_bytes
        assert ps.host_pool.allocated_bytes == first, "later steps reuse the pinned buffers"
        assert ps.host_pool.reused >= STEPS - 1
        # the strided ones (w_t, w_rows) through copy_into; the others read in place
        assert copies == [device] * 2 * STEPS
    finally:
        here.send(None)
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        ps.close()


def test_a_tensor_without_data_is_refused_naming_it():
    """A meta tensor (a parameter never materialized) has no bytes: refused before any copy,
    naming it (it was torch's bare NotImplementedError)."""
    from ckpt_engine.errors import CheckpointError

    ps = ParameterServer(device_type="cpu")
    try:
        named = {"a": torch.ones(4, 4).t(), "layers.0.w": torch.empty(4, device="meta")}
        with pytest.raises(CheckpointError, match=r"named_tensors\['layers.0.w'\].*meta"):
            ps.register_checkpoint("x", named_tensors=named)
        assert ps.registered_checkpoints() == []
    finally:
        ps.close()


def test_queued_device_copies_are_waited_for_when_a_later_copy_fails(monkeypatch):
    """Device-to-host copies already queued into the (pooled) buffers are waited for before the
    failed registration hands the buffers back: no copy may land in a buffer the pool gives
    to someone else. The error names the tensor whose copy failed."""
    from ckpt_engine.errors import CheckpointError

    events: list[str] = []
    calls = []

    def fake_copy_into(dst, tensor):
        calls.append(tensor)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        events.append("queued")
        return True  # as a device tensor's copy: queued, not yet done

    class Stream:
        def synchronize(self):
            events.append("synchronized")

    monkeypatch.setattr(named_mod, "copy_into", fake_copy_into)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    ps = ParameterServer(device_type="cpu")
    real_give_back = ps.host_pool.give_back

    def give_back(base):
        events.append("given back")
        real_give_back(base)

    monkeypatch.setattr(ps.host_pool, "give_back", give_back)
    try:
        named = {"first": torch.ones(8, 8).t(), "second": torch.ones(8, 8).t()}
        with pytest.raises(CheckpointError, match=r"named_tensors\['second'\].*illegal memory"):
            ps.register_checkpoint("x", named_tensors=named)
        assert events[:2] == ["queued", "synchronized"], events
        assert "given back" in events
    finally:
        ps.close()
