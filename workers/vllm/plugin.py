"""The ``vllm.general_plugins`` entry point of this package (setup.cfg): registers the
``ckpt_engine`` weight-transfer backend (``workers.vllm.engine``) with vLLM's
``WeightTransferEngineFactory``, and the ``remote_instance`` load format
(``workers.vllm.fork.RemoteInstanceModelLoader``) with ``register_model_loader``. vLLM loads
general plugins in every one of its processes, and a second registration of a name raises there
(the factory) or warns (the loaders), so this registers once per process; the engine's module
(and vLLM's base class) is imported only when a worker builds the engine."""

from __future__ import annotations

import contextlib

BACKEND = "ckpt_engine"
LOAD_FORMAT = "remote_instance"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    # ValueError: the name is taken in this process already (an earlier registration, e.g.
    # through another import path of this module): the first one stays
    with contextlib.suppress(ValueError):
        WeightTransferEngineFactory.register_engine(
            BACKEND, "workers.vllm.engine", "CkptEngineWeightTransferEngine"
        )
    from vllm.model_executor.model_loader import register_model_loader

    from workers.vllm.fork import RemoteInstanceModelLoader

    register_model_loader(LOAD_FORMAT)(RemoteInstanceModelLoader)
    _registered = True
