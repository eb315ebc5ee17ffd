"""workers.vllm.CkptEngineWorkerExtension's own logic, fed by a real (one-rank, CPU) parameter
server, with vLLM's layerwise reload replaced by a recorder (``ModelReload``'s interface): the
check before any write, target and drafter loaded in the same pass, one finish per model after
the last bucket, the status after a refusal and after a failure once writes began.

The real vLLM (its reload, its models, repacked layers) runs in tests/engines/test_vllm_*.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from adapter_testutil import FakeModel, checkpoint, start_ps

from ckpt_engine.errors import UpdateError
from workers.errors import WeightCheckError
from workers.vllm import CkptEngineWorkerExtension, extension


@pytest.fixture
def ps(tmp_path, monkeypatch):
    server = start_ps(tmp_path, monkeypatch)
    yield server
    server.close()


class RecordingReload:
    """``workers.vllm.reload.ModelReload``'s interface over a FakeModel."""

    events: list = []
    refuse: str | None = None  # a tensor name the check refuses
    fail_at_load: int | None = None  # the load call (0-based) that raises

    def __init__(self, model, model_config) -> None:
        self.model = model
        self.started = False
        self.loads = 0

    def check(self, manifest) -> None:
        self.events.append(("check", self.model, len(manifest)))
        if any(name == self.refuse for name, _, _ in manifest):
            raise WeightCheckError([f"{self.refuse}: unknown"])

    def load(self, weights) -> None:
        if self.loads == self.fail_at_load:
            raise RuntimeError(f"injected failure in load {self.loads}")
        self.started = True
        self.loads += 1
        self.events.append(("load", self.model))
        self.model.load_weights(weights)

    def finish(self) -> None:
        self.events.append(("finish", self.model))

    def abandon(self) -> None:
        self.events.append(("abandon", self.model, self.started))


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(RecordingReload, "events", [])
    monkeypatch.setattr(RecordingReload, "refuse", None)
    monkeypatch.setattr(RecordingReload, "fail_at_load", None)
    monkeypatch.setattr(extension, "ModelReload", RecordingReload)
    return RecordingReload


class FakeWorkerBase:
    """The attributes of vLLM's Worker the extension uses."""

    def __init__(self, *, drafter: bool) -> None:
        self.device = torch.device("cpu")
        self.local_rank = 0
        self.vllm_config = None
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


def push(ps, worker, tensors, name="c"):
    ps.register_checkpoint(name, named_tensors=tensors)
    ps.gather_metas(name)
    try:
        ps.update(name, lambda paths: worker.update_weights_from_ipc(dict(paths)))
    finally:
        ps.unregister_checkpoint(name)


@pytest.mark.parametrize("drafter", [False, True], ids=["target", "target+drafter"])
def test_update_checks_then_loads_every_model_then_finishes_once(ps, recorder, drafter):
    worker = inject(FakeWorkerBase, CkptEngineWorkerExtension)(drafter=drafter)
    tensors = checkpoint()
    push(ps, worker, tensors)

    runner = worker.model_runner
    models = [runner.model] + ([runner.drafter.model] if drafter else [])
    for model in models:
        assert model.calls > 1  # one call per bucket
        assert set(model.received) == set(tensors)
        assert all(torch.equal(model.received[n], t) for n, t in tensors.items())
    kinds = [e[0] for e in recorder.events]
    assert kinds[: len(models)] == ["check"] * len(models)  # every model checked first
    assert [e for e in recorder.events if e[0] == "finish"] == [("finish", m) for m in models]
    assert kinds[-len(models) :] == ["finish"] * len(models)  # after the last bucket
    assert len({m.calls for m in models}) == 1  # the drafter got every bucket, in the same pass
    assert worker.ckpt_engine_status()["status"] == "ready"
    assert worker.ckpt_engine_status()["updates"] == 1


def test_a_refused_update_writes_nothing_and_keeps_the_status(ps, recorder):
    worker = inject(FakeWorkerBase, CkptEngineWorkerExtension)(drafter=False)
    recorder.refuse = "model.norm.weight"
    with pytest.raises(UpdateError, match=r"model\.norm\.weight: unknown"):
        push(ps, worker, checkpoint())
    assert worker.model_runner.model.calls == 0
    assert [e[0] for e in recorder.events] == ["check", "abandon"]
    status = worker.ckpt_engine_status()
    assert status["status"] == "ready" and "refused before any write" in status["detail"]


def test_a_failure_after_writes_abandons_the_reload_and_reports_it(ps, recorder):
    worker = inject(FakeWorkerBase, CkptEngineWorkerExtension)(drafter=False)
    recorder.fail_at_load = 2
    with pytest.raises(UpdateError, match="injected failure in load 2"):
        push(ps, worker, checkpoint())
    assert ("abandon", worker.model_runner.model, True) in recorder.events
    assert "finish" not in [e[0] for e in recorder.events]
    status = worker.ckpt_engine_status()
    assert status["status"] == "weights_inconsistent" and "after writing" in status["detail"]

    recorder.fail_at_load = None  # the next good update makes it ready again
    worker.model_runner.model.received.clear()
    push(ps, worker, checkpoint(), name="d")
    assert worker.ckpt_engine_status()["status"] == "ready"


def test_a_handle_for_another_device_is_refused_before_connecting(recorder):
    worker = inject(FakeWorkerBase, CkptEngineWorkerExtension)(drafter=False)
    with pytest.raises(ValueError, match="no socket for this worker's device CPU-"):
        worker.update_weights_from_ipc({"GPU-other": "ipc:///nowhere.sock"})
    assert worker.model_runner.model.calls == 0 and recorder.events == []
