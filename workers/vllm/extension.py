"""``--worker-extension-cls workers.vllm.CkptEngineWorkerExtension``: ckpt-engine updates inside
vLLM's workers, driven by ``POST /collective_rpc`` (vLLM's dev mode).

vLLM adds this class to the bases of its worker (``WorkerWrapperBase.init_worker``), so the
methods run as worker methods and use the worker's attributes: ``device``, ``local_rank``,
``vllm_config``, ``model_config``, ``model_runner.model`` and, with speculative decoding,
``model_runner.drafter.model``. vLLM refuses an extension whose attribute names clash with the
worker's, hence the ``ckpt_engine`` prefix of everything but ``update_weights_from_ipc``.

``update_weights_from_ipc(zmq_handles)``, per update (``workers.vllm.reload``): the manifest is
checked against every model by a dry run before anything is written (refused: the model is
untouched); the first bucket starts vLLM's layerwise reload; each bucket is copied and loaded into
the target model and, in the same pass, the drafter; after the last bucket of every rank,
``finalize_layerwise_reload`` once per model. With the plan's Ack, each rank reports the rows
of each checkpoint tensor its loaders read (``workers.vllm.keeps``; P2P receivers read only
those). A failure after the reload started puts the
previous weights back into every layer not yet complete (servable, no meta tensors; the model is
then a mix of old and new layers), raises to the caller (on the instance's last rank only:
``reports_failures``), and ``ckpt_engine_status`` reports
``weights_inconsistent`` with the cause until an update succeeds. vLLM keeps serving meanwhile:
it has no notion of unservable weights on this path (the native backend, ``workers.vllm.engine``,
keeps vLLM paused instead).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import time
import weakref
from typing import Any

import torch

from ckpt_engine import device_key, dtypes, update_weights_from_ipc
from workers.env import ENV
from workers.vllm.keeps import model_keeps
from workers.vllm.reload import ModelReload, Weights, effective_weights

logger = logging.getLogger(__name__)


def _vllm_config_context(vllm_config: Any):
    if vllm_config is None:
        return contextlib.nullcontext()
    from vllm.config import set_current_vllm_config

    return set_current_vllm_config(vllm_config)


def _test_delay(bucket: int) -> None:
    """CKPT_ENGINE_TEST_BUCKET_DELAY_FILE (workers.env): tests only."""
    path = ENV.test_bucket_delay_file
    if path is None:
        return
    try:
        with open(path) as f:
            delay = float(f.read().strip() or 0)
    except FileNotFoundError:
        return
    logger.warning("test delay: bucket %d loaded", bucket)
    time.sleep(delay)


def reports_failures() -> bool:
    """Whether this worker raises the failures of an update: only the last rank of the vLLM
    instance does. vLLM 0.32's multiprocess executor (TP > 1) raises at the first failed
    rank's reply of a collective call and leaves the other ranks' replies queued, where the next
    call reads them (it then fails with the old error, and those ranks stay one reply behind);
    the replies are read in rank order, so a failure raised by the last rank alone leaves
    nothing queued. Every rank fails an update together (the parameter server aborts all), so
    the last rank's error carries the cause. True outside vLLM's workers (one rank)."""
    try:
        from vllm.distributed.parallel_state import get_world_group

        group = get_world_group()
    except Exception:  # vLLM absent or its groups not built: a single worker
        return True
    return group.rank_in_group == group.world_size - 1


class UpdateStatus:
    """What the last update left: ``ready`` (weights of the last successful update, or the
    initial ones), ``updating``, or ``weights_inconsistent`` (a failure after writes)."""

    def __init__(self) -> None:
        self.status = "ready"
        self.detail = ""
        self.updates = 0
        self.failures = 0
        self.last_update_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "detail": self.detail,
            "updates": self.updates,
            "failures": self.failures,
            "last_update_s": self.last_update_s,
        }


_STATUSES: weakref.WeakKeyDictionary[torch.nn.Module, UpdateStatus] = weakref.WeakKeyDictionary()


def status_of(model: torch.nn.Module) -> UpdateStatus:
    """``model``'s update status: one per model, whichever way updates it (this extension or the
    weight-transfer engine, ``workers.vllm.engine``; a server may enable both)."""
    return _STATUSES.setdefault(model, UpdateStatus())


def receive_update(
    zmq_ctx: Any,
    zmq_handle: str,
    device_id: int,
    reloads: list[ModelReload],
    status: UpdateStatus,
    *,
    timeout_s: float | None = None,
    wire: str | None = None,
) -> None:
    """One update from the parameter server into ``reloads``' models; ``status`` follows it.

    Shared by the worker extension and the native transfer engine."""
    started = time.perf_counter()
    previous = status.status
    status.status, status.detail = "updating", ""

    def validate(manifest) -> None:
        if any(reload.started for reload in reloads):
            return  # the upstream wire validates after its last bucket: the loads checked it
        specs = [(s.name, dtypes.to_torch(s.dtype), tuple(s.shape)) for s in manifest]
        for reload in reloads:
            reload.check(specs)

    buckets = 0

    def run(weights: Weights) -> None:
        nonlocal buckets
        for reload in reloads:
            reload.load(weights)
        buckets += 1
        _test_delay(buckets - 1)

    def post_hook() -> None:
        for reload in reloads:
            reload.finish()

    def keeps(specs) -> dict:
        if len(reloads) != 1:  # a drafter loads the same tensors too: read them whole
            return {}
        try:
            return model_keeps(reloads[0].model, specs)
        except Exception as e:  # whole tensors are always right: never fail an update here
            logger.warning("ckpt-engine: no kept rows reported (%s: %s)", type(e).__name__, e)
            return {}

    try:
        update_weights_from_ipc(
            zmq_ctx,
            zmq_handle,
            device_id,
            run=run,
            post_hook=post_hook,
            validate=validate,
            timeout_s=timeout_s,
            wire=wire,
            keeps=keeps,
        )
    except BaseException as e:
        wrote = any(reload.started for reload in reloads)
        for reload in reloads:
            reload.abandon()
        status.failures += 1
        cause = f"{type(e).__name__}: {e}"
        if wrote:
            status.status = "weights_inconsistent"
            status.detail = f"update failed after writing weights: {cause}"
        else:
            status.status = previous  # untouched: ready, or still inconsistent from before
            status.detail = f"update refused before any write: {cause}"
        raise
    status.status, status.detail = "ready", ""
    status.updates += 1
    status.last_update_s = time.perf_counter() - started


def checksums(models: list[torch.nn.Module]) -> dict[str, str]:
    """sha256 of every parameter as the model computes with it (``effective_weights``), keyed
    ``<model index>:<parameter name>``: covers the repacked layers vLLM's ``/weight_checker``
    skips."""
    out = {}
    for i, model in enumerate(models):
        for name, tensor in effective_weights(model).items():
            data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
            out[f"{i}:{name}"] = hashlib.sha256(data).hexdigest()
    return out


class CkptEngineWorkerExtension:
    """``--worker-extension-cls workers.vllm.CkptEngineWorkerExtension``; see the module doc."""

    @functools.cached_property
    def _ckpt_engine_zmq_ctx(self):
        import zmq

        return zmq.Context()

    @functools.cached_property
    def _ckpt_engine_update_status(self) -> UpdateStatus:
        return status_of(self.model_runner.model)

    def _ckpt_engine_models(self) -> list:
        """The target model, then the drafter's model when speculative decoding has one."""
        runner = self.model_runner
        models = [runner.model]
        drafter = getattr(runner, "drafter", None)
        if getattr(drafter, "model", None) is not None:
            models.append(drafter.model)
        return models

    def _ckpt_engine_device(self) -> tuple[str, int]:
        device = self.device
        if device is None or device.type not in ("cuda", "cpu"):
            raise ValueError(f"ckpt-engine updates need a cuda or cpu worker, not {device}")
        if device.type == "cuda":
            return device_key(device.index, device_type="cuda"), device.index
        return device_key(self.local_rank, device_type="cpu"), self.local_rank

    def update_weights_from_ipc(self, zmq_handles: dict[str, str]) -> None:
        """Receive one update from the parameter-server rank on this worker's device; a failure
        raises on the instance's last rank only (``reports_failures``)."""
        try:
            self._ckpt_engine_update(zmq_handles)
        except Exception as e:
            if reports_failures():
                raise
            logger.error("ckpt-engine update failed (the last rank reports it): %s", e)

    def _ckpt_engine_update(self, zmq_handles: dict[str, str]) -> None:
        key, device_id = self._ckpt_engine_device()
        if key not in zmq_handles:
            raise ValueError(
                f"zmq_handles has no socket for this worker's device {key} "
                f"(got {', '.join(sorted(zmq_handles)) or 'none'})"
            )
        reloads = [ModelReload(m, self.model_config) for m in self._ckpt_engine_models()]
        with _vllm_config_context(getattr(self, "vllm_config", None)):
            receive_update(
                self._ckpt_engine_zmq_ctx,
                zmq_handles[key],
                device_id,
                reloads,
                self._ckpt_engine_update_status,
            )

    def ckpt_engine_status(self) -> dict[str, Any]:
        """This worker's update status (``UpdateStatus`` of its target model, updated by either
        way) and its device key."""
        return {
            **self._ckpt_engine_update_status.as_dict(),
            "device": self._ckpt_engine_device()[0],
        }

    @functools.cached_property
    def _ckpt_engine_seed(self):
        from workers.vllm.seed import VllmSeed

        return VllmSeed(self)

    def ckpt_engine_fork_manifest(self) -> dict[str, Any]:
        """Seed (``workers.vllm.seed``): this rank's fork manifest."""
        from workers.vllm.seed import MANIFEST, answer

        return answer(MANIFEST, self._ckpt_engine_seed.manifest)

    def ckpt_engine_fork_init(self, **kwargs: str) -> dict[str, Any]:
        """Seed: form this rank's pair groups with a forking client's ranks (vLLM PR #27417's
        init_weights_send_group_for_remote_instance)."""
        from workers.vllm.seed import INIT, answer

        return answer(INIT, lambda: self._ckpt_engine_seed.init(**kwargs))

    def ckpt_engine_fork_send(self, **kwargs: str) -> dict[str, Any]:
        """Seed: send this rank's weights to the client of that group (PR #27417's
        send_weights_to_remote_instance)."""
        from workers.vllm.seed import SEND, answer

        with _vllm_config_context(getattr(self, "vllm_config", None)):
            return answer(SEND, lambda: self._ckpt_engine_seed.send(**kwargs))

    def ckpt_engine_checksums(self) -> dict[str, str]:
        """``checksums`` of this worker's models (its shard of each parameter)."""
        return checksums(self._ckpt_engine_models())
