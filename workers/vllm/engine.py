"""The ``ckpt_engine`` backend of vLLM's weight-transfer engines (vLLM >= 0.32).

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model M \\
        --load-format dummy --weight-transfer-config '{"backend": "ckpt_engine"}'

No worker extension: ``workers.vllm.plugin.register`` (the ``vllm.general_plugins`` entry point
of this package) adds the backend to ``WeightTransferEngineFactory`` in every vLLM process, and
vLLM builds one engine per worker after the model is loaded. The updater
(``examples/update.py --inference-api weight_transfer``) drives vLLM's RL endpoints:

- ``POST /pause?mode=wait`` (requests running finish on the old weights; new ones wait);
- ``POST /init_weight_transfer_engine {"init_info": {"wire": "ckpt-engine"}}``
  (``CkptEngineInitInfo``; ``"upstream"`` speaks checkpoint-engine 0.4.x's wire);
- ``POST /start_weight_update``: nothing is touched yet;
- ``POST /update_weights {"update_info": {"zmq_handles": {device key: socket}}}``
  (``CkptEngineUpdateInfo``; every worker picks its own device's socket): one whole ckpt-engine
  update, ``workers.vllm.extension.receive_update``: the manifest is checked by a dry run before
  anything is written, the layerwise reload starts at the first bucket, every tensor is copied
  before vLLM sees it, and ``finalize_layerwise_reload`` runs once after the last bucket of every
  rank. Returns when the weights are in place;
- ``POST /finish_weight_update {"weight_version": v}``, ``POST /resume``.

Failures (``receive_weights`` raises, and vLLM ends the session): refused before any write, the
model is untouched; after writes began, every layer not yet complete gets its previous weights
back (no meta tensors are left, so vLLM stays servable and a new start/update/finish works), and
the updater leaves vLLM paused: ``/is_paused`` stays true, with the cause in vLLM's log and the
updater's exit message, until a complete update resumes it. ``finish_weight_update`` after a
session in which nothing landed does nothing: the model still holds its previous weights.

TP > 1: a failure raises on the instance's last rank only (``extension.reports_failures``:
vLLM 0.32's multiprocess executor misreads the replies after a failure raised by an earlier
rank). vLLM then ends the session on that rank only; the others keep it open. The last rank's
engine remembers it, and the next ``/init_weight_transfer_engine`` fails (on that rank alone)
with ``SESSIONS_LEFT_OPEN``: the updater then posts ``/finish_weight_update`` (closes the open
sessions; fails on the last rank only) and initializes again. So a failed or killed updater
never blocks the next one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from ckpt_engine import device_key
from ckpt_engine.compat import WIRES
from workers.vllm.extension import receive_update, reports_failures, status_of
from workers.vllm.reload import ModelReload

logger = logging.getLogger(__name__)

SESSIONS_LEFT_OPEN = "ckpt_engine: weight update sessions left open"


@dataclass
class CkptEngineInitInfo(WeightTransferInitInfo):
    """``init_info`` of ``/init_weight_transfer_engine``."""

    wire: str = "ckpt-engine"
    """The protocol to the parameter server: ``ckpt-engine`` or ``upstream``."""
    timeout_s: float | None = None
    """Seconds to wait for the parameter server's first message (default: the worker's)."""

    def __post_init__(self) -> None:
        if self.wire not in WIRES:
            raise ValueError(f"init_info wire {self.wire!r}: use one of {', '.join(WIRES)}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"init_info timeout_s must be positive, got {self.timeout_s}")


@dataclass
class CkptEngineUpdateInfo(WeightTransferUpdateInfo):
    """``update_info`` of ``/update_weights``: the socket of every device of the instance."""

    zmq_handles: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.zmq_handles or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.zmq_handles.items()
        ):
            raise ValueError("update_info needs zmq_handles: {device key: socket address}")


class CkptEngineWeightTransferEngine(
    WeightTransferEngine[CkptEngineInitInfo, CkptEngineUpdateInfo]
):
    """``--weight-transfer-config '{"backend": "ckpt_engine"}'``; see the module doc."""

    init_info_cls = CkptEngineInitInfo
    update_info_cls = CkptEngineUpdateInfo

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module):
        super().__init__(config, vllm_config, device, model)
        self.init_info = CkptEngineInitInfo()
        self.status = status_of(model)  # shared with the worker extension's, if enabled
        self.landed = False  # a complete update since start_weight_update
        self.sessions_left_open = False  # the last rank: a failure left the others' open
        self._zmq_ctx = None

    def init_transfer_engine(self, init_info: CkptEngineInitInfo) -> None:
        if self.sessions_left_open:
            self.sessions_left_open = False
            raise RuntimeError(
                f"{SESSIONS_LEFT_OPEN}: the last update failed, and vLLM still holds its weight "
                "update open on the other ranks: POST /finish_weight_update (it fails on this "
                "rank only), then initialize again"
            )
        self.init_info = init_info

    def start_weight_update(self) -> None:
        # The reload starts at the first bucket, after the manifest was accepted: a refused or
        # failed update never leaves meta tensors behind.
        self.landed = False

    def _device(self) -> tuple[str, int]:
        if self.device.type == "cuda":
            return device_key(self.device.index, device_type="cuda"), self.device.index
        if self.device.type != "cpu":
            raise ValueError(f"ckpt-engine updates need a cuda or cpu worker, not {self.device}")
        from vllm.distributed.parallel_state import get_world_group

        local_rank = get_world_group().local_rank
        return device_key(local_rank, device_type="cpu"), local_rank

    def receive_weights(self, update_info: CkptEngineUpdateInfo) -> None:
        key, device_id = self._device()
        handle = update_info.zmq_handles.get(key)
        if handle is None:
            raise ValueError(
                f"zmq_handles has no socket for this worker's device {key} "
                f"(got {', '.join(sorted(update_info.zmq_handles))})"
            )
        if self._zmq_ctx is None:
            import zmq

            self._zmq_ctx = zmq.Context()
        try:
            receive_update(
                self._zmq_ctx,
                handle,
                device_id,
                [ModelReload(self.model, self.model_config)],
                self.status,
                timeout_s=self.init_info.timeout_s,
                wire=self.init_info.wire,
            )
        except Exception:
            logger.error("ckpt_engine weight update failed: %s", self.status.detail)
            if not reports_failures():
                return  # vLLM's session stays open here; the last rank reports (see above)
            self.sessions_left_open = self.parallel_config.world_size > 1
            raise
        self.landed = True

    def finish_weight_update(self) -> None:
        # finalize_layerwise_reload already ran after the last bucket (the update's commit)
        if not self.landed:
            logger.warning(
                "finish_weight_update without a complete update: the model keeps its weights "
                "(status %s%s)",
                self.status.status,
                f": {self.status.detail}" if self.status.detail else "",
            )
        self.landed = False

    def shutdown(self) -> None:
        if self._zmq_ctx is not None:
            self._zmq_ctx.term()
            self._zmq_ctx = None
