"""workers.vllm.CkptEngineWorkerExtension against a fake vLLM worker of the same shape, fed by a
real (one-rank, CPU) parameter server: target and drafter loaded in the same pass, vLLM's
`process_weights_after_loading(model, model_config, device)` once per model after the last bucket.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from adapter_testutil import FakeModel, checkpoint, start_ps

from workers.vllm import CkptEngineWorkerExtension


@pytest.fixture
def ps(tmp_path, monkeypatch):
    server = start_ps(tmp_path, monkeypatch)
    yield server
    server.close()


@pytest.fixture
def post_calls(monkeypatch):
    """A stand-in `vllm.model_executor.model_loader.utils` (vLLM is not installed)."""
    calls = []
    names = ["vllm", "vllm.model_executor", "vllm.model_executor.model_loader"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    utils = types.ModuleType("vllm.model_executor.model_loader.utils")
    utils.process_weights_after_loading = lambda model, config, device: calls.append(
        (model, config, device)
    )
    monkeypatch.setitem(sys.modules, utils.__name__, utils)
    return calls


class FakeWorkerBase:
    """The attributes of vLLM's GPU Worker the extension uses."""

    def __init__(self, *, drafter: bool) -> None:
        self.device = torch.device("cpu")
        self.local_rank = 0
        self.model_config = SimpleNamespace(dtype=torch.float32)
        runner = SimpleNamespace(model=FakeModel())
        if drafter:
            runner.drafter = SimpleNamespace(model=FakeModel())
        self.model_runner = runner

    def execute_model(self):  # a worker method, as vLLM's
        return None


def inject(worker_cls, ext):
    """What vLLM's WorkerWrapperBase.init_worker does with --worker-extension-cls."""
    for attr in dir(ext):
        if not attr.startswith("__"):
            assert not hasattr(worker_cls, attr), f"{attr} clashes with the worker"
    return type("Worker", (worker_cls, ext), {})


@pytest.mark.parametrize("drafter", [False, True], ids=["target", "target+drafter"])
def test_update_loads_every_model_then_post_processes_once(ps, post_calls, drafter):
    worker = inject(FakeWorkerBase, CkptEngineWorkerExtension)(drafter=drafter)
    tensors = checkpoint()
    ps.register_checkpoint("c", named_tensors=tensors)
    ps.gather_metas("c")
    ps.update("c", lambda paths: worker.update_weights_from_ipc(dict(paths)))

    runner = worker.model_runner
    models = [runner.model] + ([runner.drafter.model] if drafter else [])
    for model in models:
        assert model.calls > 1  # one call per bucket
        assert set(model.received) == set(tensors)
        assert all(torch.equal(model.received[n], t) for n, t in tensors.items())
    assert post_calls == [(m, worker.model_config, worker.device) for m in models]
    assert len({m.calls for m in models}) == 1  # the drafter got every bucket, in the same pass


def test_a_handle_for_another_device_is_refused_before_connecting(post_calls):
    worker = inject(FakeWorkerBase, CkptEngineWorkerExtension)(drafter=False)
    with pytest.raises(ValueError, match="no socket for this worker's device CPU-"):
        worker.update_weights_from_ipc({"GPU-other": "ipc:///nowhere.sock"})
    assert worker.model_runner.model.calls == 0 and post_calls == []
