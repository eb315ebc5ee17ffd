"""vLLM adapter: a worker extension that applies ckpt-engine weight updates inside vLLM.

Launch vLLM with it (``/collective_rpc`` exists only in vLLM's dev mode)::

    VLLM_SERVER_DEV_MODE=1 vllm serve <model> --load-format dummy \\
        --worker-extension-cls workers.vllm.CkptEngineWorkerExtension

then push weights with ``torchrun --nproc-per-node N examples/update.py --endpoint
http://<vllm host:port> --inference-parallel-size <tp>``, which POSTs ``/collective_rpc``
``{"method": "update_weights_from_ipc", "args": [{device_key: zmq_address, ...}]}``.

vLLM adds this class to the bases of its GPU ``Worker`` (``WorkerWrapperBase.init_worker``), so
the methods run as worker methods and use the worker's attributes: ``self.device`` (a
``torch.device``), ``self.local_rank``, ``self.model_config``, ``self.model_runner.model`` and,
with speculative decoding (EAGLE / MTP), ``self.model_runner.drafter.model``. vLLM refuses an
extension whose attribute names clash with the worker's, hence the ``_ckpt_engine`` prefix.

Per update: each bucket goes to ``model.load_weights`` and, in the same pass, to the drafter's
``load_weights``; after the last bucket, once, vLLM's own
``vllm.model_executor.model_loader.utils.process_weights_after_loading(model, model_config,
device)`` for the model and the drafter (quantization repacking). Nothing imports vLLM until an
update runs. FP8 models need vLLM's in-place ``process_weights_after_loading`` (vLLM PR #24488):
stock vLLM rebinds FP8 parameters there, which breaks the next update.

vLLM models have no ``check_weights``: names and shapes are checked by ``load_weights`` bucket by
bucket, so an update that does not fit fails after earlier buckets were written. vLLM itself has
no notion of servable weights: after a failed update, push a good one before serving again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ckpt_engine import device_key, update_weights_from_ipc

Weights = list[tuple[str, torch.Tensor]]


def _process_weights_after_loading() -> Callable[[Any, Any, torch.device], None]:
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    return process_weights_after_loading


class CkptEngineWorkerExtension:
    """``--worker-extension-cls workers.vllm.CkptEngineWorkerExtension``; see the module doc."""

    @functools.cached_property
    def _ckpt_engine_zmq_ctx(self):
        import zmq

        return zmq.Context()

    def _ckpt_engine_models(self) -> list:
        """The target model, then the drafter's model when speculative decoding has one."""
        runner = self.model_runner
        models = [runner.model]
        drafter = getattr(runner, "drafter", None)
        if getattr(drafter, "model", None) is not None:
            models.append(drafter.model)
        return models

    def _ckpt_engine_device_key(self) -> str:
        device = self.device
        if device is None or device.type not in ("cuda", "cpu"):
            raise ValueError(f"ckpt-engine updates need a cuda or cpu worker, not {device}")
        if device.type == "cuda":
            return device_key(device.index, device_type="cuda")
        return device_key(self.local_rank, device_type="cpu")

    def update_weights_from_ipc(self, zmq_handles: dict[str, str]) -> None:
        """Receive one update from the parameter-server rank on this worker's device."""
        key = self._ckpt_engine_device_key()
        if key not in zmq_handles:
            raise ValueError(
                f"zmq_handles has no socket for this worker's device {key} "
                f"(got {', '.join(sorted(zmq_handles)) or 'none'})"
            )
        models = self._ckpt_engine_models()
        device = self.device

        def run(weights: Weights) -> None:
            for model in models:
                model.load_weights(weights=weights)

        def post_hook() -> None:
            process = _process_weights_after_loading()
            for model in models:
                process(model, self.model_config, device)

        update_weights_from_ipc(
            self._ckpt_engine_zmq_ctx,
            zmq_handles[key],
            device.index if device.type == "cuda" else self.local_rank,
            run=run,
            post_hook=post_hook,
        )
