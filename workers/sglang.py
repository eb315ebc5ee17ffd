"""SGLang adapter: apply ckpt-engine weight updates to an SGLang ``ModelRunner``.

SGLang serves ``POST /update_weights_from_ipc {"zmq_handles", "flush_cache", "weight_version"}``
and, in each TP rank's scheduler, hands ``zmq_handles`` to every model runner (target, then
draft) through ``SGLangCheckpointEngineWorkerExtensionImpl(model_runner)
.update_weights_from_ipc(zmq_handles)``, which calls upstream checkpoint-engine's worker. This
module is the same shape with ckpt-engine's worker primitive (our wire protocol), so an SGLang
build can route that call here::

    from workers.sglang import CkptEngineSGLangWorker
    CkptEngineSGLangWorker(model_runner).update_weights_from_ipc(recv_req.zmq_handles)

(or ``update_model_runner_from_ipc(model_runner, zmq_handles)``), and
``torchrun ... examples/update.py --inference-api update_weights_from_ipc`` drives it.

What it reads of the model runner (SGLang's ``ModelRunner`` attributes): ``model`` (its
``load_weights(weights)`` takes each bucket; ``post_load_weights()`` if present), ``device``
(``"cuda"``, ``"cpu"``, ...), ``gpu_id`` (the CUDA index) and ``tp_rank`` (the device index on
CPU). Device key: ``GPU-<uuid>`` of ``cuda:gpu_id``, as SGLang's ``get_device_uuid``.

The post-hook, once after the last bucket, is SGLang's: every module with a ``quant_method`` runs
``quant_method.process_weights_after_loading(module)`` inside SGLang's
``device_loading_context(module, device)`` (a no-op context when SGLang is not importable, as in
tests), then ``model.post_load_weights()``. Unlike SGLang's own hook, an exception there is not
only logged: it fails the update, so SGLang answers ``success: false`` instead of serving weights
half post-processed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ckpt_engine import device_key, update_weights_from_ipc


def _device_loading_context() -> Callable[[Any, torch.device], Any]:
    try:
        from sglang.srt.model_loader.loader import device_loading_context
    except ImportError:
        return lambda module, device: contextlib.nullcontext()
    return device_loading_context


class CkptEngineSGLangWorker:
    """ckpt-engine's counterpart of SGLang's ``SGLangCheckpointEngineWorkerExtensionImpl``."""

    def __init__(self, model_runner: Any, *, zmq_ctx: Any = None) -> None:
        self.model_runner = model_runner
        self._zmq_ctx = zmq_ctx
        self._owns_ctx = zmq_ctx is None

    @property
    def zmq_ctx(self):
        if self._zmq_ctx is None:
            import zmq

            self._zmq_ctx = zmq.Context()
        return self._zmq_ctx

    def close(self) -> None:
        """Terminate the ZMQ context if this object created it."""
        if self._zmq_ctx is not None and self._owns_ctx:
            self._zmq_ctx.term()
            self._zmq_ctx = None

    def device(self) -> torch.device:
        runner = self.model_runner
        kind = str(runner.device)
        if kind == "cuda":
            return torch.device("cuda", int(runner.gpu_id))
        if kind == "cpu":
            return torch.device("cpu")
        raise ValueError(f"ckpt-engine updates need a cuda or cpu model runner, not {kind!r}")

    def device_index(self) -> int:
        device = self.device()
        return device.index if device.type == "cuda" else int(self.model_runner.tp_rank)

    def device_key(self) -> str:
        return device_key(self.device_index(), device_type=self.device().type)

    def post_hook(self) -> None:
        model, device = self.model_runner.model, self.device()
        context = _device_loading_context()
        for _, module in model.named_modules():
            quant_method = getattr(module, "quant_method", None)
            if quant_method is not None:
                with context(module, device):
                    quant_method.process_weights_after_loading(module)
        if hasattr(model, "post_load_weights"):
            model.post_load_weights()

    def update_weights_from_ipc(
        self, zmq_handles: dict[str, str], *, timeout_s: float | None = None
    ) -> None:
        """Receive one update from the parameter-server rank on this runner's device."""
        key = self.device_key()
        if key not in zmq_handles:
            raise ValueError(
                f"zmq_handles has no socket for this runner's device {key} "
                f"(got {', '.join(sorted(zmq_handles)) or 'none'})"
            )
        update_weights_from_ipc(
            self.zmq_ctx,
            zmq_handles[key],
            self.device_index(),
            run=self.model_runner.model.load_weights,
            post_hook=self.post_hook,
            timeout_s=timeout_s,
        )


def update_model_runner_from_ipc(
    model_runner: Any, zmq_handles: dict[str, str], *, timeout_s: float | None = None
) -> tuple[bool, str]:
    """SGLang's weight-updater contract: ``(success, message)``, never raising."""
    worker = CkptEngineSGLangWorker(model_runner)
    try:
        worker.update_weights_from_ipc(zmq_handles, timeout_s=timeout_s)
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"
    finally:
        worker.close()
    return True, "IPC weight update completed successfully"
