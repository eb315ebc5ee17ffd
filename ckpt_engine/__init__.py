"""ckpt-engine: move LLM weights into running inference engines.

The parameter-server side. This package knows no inference engine: `workers` imports it, never
the reverse.
"""

from ckpt_engine.device import device_key
from ckpt_engine.errors import (
    CheckpointError,
    CheckpointFileError,
    CkptEngineError,
    CollectiveError,
    MetasError,
    ProtocolError,
    UpdateAborted,
    UpdateError,
    UpdateTimeout,
    WorkerError,
)
from ckpt_engine.metas import CheckpointMetas, RankMetas, TensorMeta
from ckpt_engine.ps import ParameterServer, PSConfig
from ckpt_engine.wire import TensorSpec
from ckpt_engine.worker import update_weights_from_ipc

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointFileError",
    "CheckpointMetas",
    "CkptEngineError",
    "CollectiveError",
    "MetasError",
    "PSConfig",
    "ParameterServer",
    "ProtocolError",
    "RankMetas",
    "TensorMeta",
    "TensorSpec",
    "UpdateAborted",
    "UpdateError",
    "UpdateTimeout",
    "WorkerError",
    "__version__",
    "device_key",
    "update_weights_from_ipc",
]
