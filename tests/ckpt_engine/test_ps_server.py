"""ParameterServer end to end in one process: world size 1, the worker on a thread."""

import os
import threading
import time

import pytest
import torch
import zmq

from ckpt_engine import (
    MetasError,
    ParameterServer,
    PSConfig,
    UpdateError,
    UpdateTimeout,
    update_weights_from_ipc,
)
from ckpt_engine.host_memory import FILE_PREFIX


@pytest.fixture
def ps(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("CKPT_ENGINE_SHM_DIR", str(shm))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    server = ParameterServer(
        rank=0,
        world_size=1,
        device_type="cpu",
        config=PSConfig(bucket_bytes=4096, timeout_s=5.0, connect_poll_s=0.1),
    )
    server.shm = shm
    yield server
    server.close()


def named():
    return {
        "embed": torch.randn(40, 30),  # 4800 bytes: larger than a bucket
        "norm": torch.ones(30, dtype=torch.bfloat16),
        "step": torch.tensor(3),
        **{f"tiny{i}": torch.full((i + 1,), i, dtype=torch.int16) for i in range(20)},
    }


class Inference:
    """Stands in for an inference server: req_func 'calls' it, it runs the worker primitive."""

    def __init__(self, **kwargs):
        self.kwargs, self.received, self.post_hooks, self.error = kwargs, {}, 0, None

    def req_func(self, socket_paths):
        ((key, address),) = socket_paths
        assert key.startswith("CPU-")
        t = threading.Thread(target=self._serve, args=(address,))
        t.start()
        t.join(30)
        if self.error is not None:
            raise RuntimeError(f"inference server: {self.error}")

    def _serve(self, address):
        ctx = zmq.Context()
        try:
            update_weights_from_ipc(
                ctx, address, 0, run=self._run, post_hook=self._post, **self.kwargs
            )
        except Exception as e:
            self.error = e
        finally:
            ctx.term()

    def _run(self, weights):
        for name, tensor in weights:
            self.received[name] = tensor.clone()

    def _post(self):
        self.post_hooks += 1


def leftovers(ps):
    return [n for n in os.listdir(ps.shm) if n.startswith(FILE_PREFIX)] + os.listdir(
        ps._socket_dir.path
    )


def test_update_delivers_every_tensor(ps):
    tensors = named()
    ps.register_checkpoint("c", named_tensors=tensors)
    metas = ps.gather_metas("c")
    assert metas.num_tensors == len(tensors) and metas.ranks[0].device_key == ps.device_key
    inference = Inference()
    ps.update("c", inference.req_func)
    assert inference.post_hooks == 1
    assert set(inference.received) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(inference.received[name], tensor)
    assert [n for n in leftovers(ps) if "ipc" in n] == []
    ps.update("c", Inference().req_func)  # again, same sockets dir


def test_req_func_failure_ends_the_update_quickly(ps):
    ps.register_checkpoint("c", named_tensors=named())
    ps.gather_metas("c")

    def req_func(socket_paths):
        raise ConnectionRefusedError("inference server is down")

    start = time.monotonic()
    with pytest.raises(UpdateError, match="inference server is down") as info:
        ps.update("c", req_func)
    assert time.monotonic() - start < 3
    assert info.value.rank == 0 and info.value.bucket is None
    assert [n for n in leftovers(ps) if "ipc" in n or n.endswith(".sock")] == []


def test_worker_that_never_connects_times_out(ps):
    ps.register_checkpoint("c", named_tensors=named())
    ps.gather_metas("c")
    with pytest.raises(UpdateTimeout, match=r"did not connect within 0\.5 s"):
        ps.update("c", lambda socket_paths: None, timeout=0.5)


def test_worker_validation_failure(ps):
    ps.register_checkpoint("c", named_tensors=named())
    ps.gather_metas("c")

    def validate(manifest):
        raise ValueError(f"model has no tensor {manifest[0].name!r}")

    inference = Inference(validate=validate)
    with pytest.raises(UpdateError, match="model has no tensor") as info:
        ps.update("c", inference.req_func)
    assert info.value.errors[0]["stage"] == "handshake"
    assert inference.received == {} and inference.post_hooks == 0


def test_update_needs_metas_and_checks_ranks(ps):
    ps.register_checkpoint("c", named_tensors=named())
    with pytest.raises(UpdateError, match="call gather_metas or load_metas"):
        ps.update("c", lambda p: None)
    for ranks in ([1], [], [0, 0], [True]):
        with pytest.raises(ValueError, match="ranks"):
            ps.update("c", lambda p: None, ranks=ranks)
    with pytest.raises(UpdateError, match="load the owners' metas"):  # P2P needs them too
        ps.update("c", lambda p: None, ranks=[0])
    with pytest.raises(MetasError, match="not registered on ranks \\[0\\]"):
        ps.gather_metas("other")


def test_metas_round_trip_through_a_file(ps, tmp_path):
    ps.register_checkpoint("c", named_tensors=named())
    path = tmp_path / "metas.json"
    ps.gather_metas("c").save(path)
    ps.unregister_checkpoint("c")
    ps.register_checkpoint("c", named_tensors=named())
    from ckpt_engine import CheckpointMetas

    ps.load_metas(CheckpointMetas.load(path))
    inference = Inference()
    ps.update("c", inference.req_func)
    assert len(inference.received) == len(named())
