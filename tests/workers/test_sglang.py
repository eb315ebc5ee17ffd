"""workers.sglang against a fake SGLang ModelRunner of the same shape (model, device, gpu_id,
tp_rank), fed by a real (one-rank, CPU) parameter server: each bucket to `model.load_weights`,
then once SGLang's post-hook (every module's `quant_method.process_weights_after_loading`, then
`model.post_load_weights()`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from adapter_testutil import FakeModel, checkpoint, start_ps

from workers.sglang import CkptEngineSGLangWorker, update_model_runner_from_ipc


@pytest.fixture
def ps(tmp_path, monkeypatch):
    server = start_ps(tmp_path, monkeypatch)
    yield server
    server.close()


class QuantMethod:
    def __init__(self, log: list, fail: bool = False) -> None:
        self.log, self.fail = log, fail

    def process_weights_after_loading(self, module) -> None:
        if self.fail:
            raise RuntimeError("repacking failed")
        self.log.append(("quant", module))


class FakeSGLangModel(FakeModel):
    def __init__(self, log: list, fail: bool = False) -> None:
        super().__init__()
        self.log = log
        self.linear = torch.nn.Linear(2, 2)
        self.linear.quant_method = QuantMethod(log, fail)

    def post_load_weights(self) -> None:
        self.log.append(("post_load_weights", self))


def runner(log: list, fail: bool = False):
    return SimpleNamespace(model=FakeSGLangModel(log, fail), device="cpu", gpu_id=0, tp_rank=0)


def test_update_loads_every_bucket_then_runs_the_post_hook(ps):
    log: list = []
    model_runner = runner(log)
    tensors = checkpoint()
    ps.register_checkpoint("c", named_tensors=tensors)
    ps.gather_metas("c")
    results = []
    ps.update(
        "c", lambda paths: results.append(update_model_runner_from_ipc(model_runner, dict(paths)))
    )

    assert results == [(True, "IPC weight update completed successfully")]
    model = model_runner.model
    assert model.calls > 1 and set(model.received) == set(tensors)
    assert all(torch.equal(model.received[n], t) for n, t in tensors.items())
    assert log == [("quant", model.linear), ("post_load_weights", model)]


def test_a_failing_post_hook_fails_the_update(ps):
    ps.register_checkpoint("c", named_tensors=checkpoint())
    ps.gather_metas("c")
    results = []
    with pytest.raises(Exception, match="repacking failed"):
        ps.update(
            "c",
            lambda paths: results.append(
                update_model_runner_from_ipc(runner([], fail=True), dict(paths))
            ),
        )
    assert results and results[0][0] is False and "repacking failed" in results[0][1]


def test_device_keys_follow_sglangs_fields():
    worker = CkptEngineSGLangWorker(SimpleNamespace(model=None, device="cpu", gpu_id=0, tp_rank=3))
    assert worker.device_key().startswith("CPU-") and worker.device_key().endswith("-3")
    with pytest.raises(ValueError, match="cuda or cpu"):
        CkptEngineSGLangWorker(
            SimpleNamespace(model=None, device="npu", gpu_id=0, tp_rank=0)
        ).device()
    ok, message = update_model_runner_from_ipc(runner([]), {"GPU-x": "ipc:///nowhere"})
    assert not ok and "no socket for this runner's device" in message
