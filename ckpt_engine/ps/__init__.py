"""The parameter-server process (one per torchrun rank): registry, metas, update drivers."""

from ckpt_engine.ps.config import PSConfig
from ckpt_engine.ps.server import ParameterServer

__all__ = ["PSConfig", "ParameterServer"]
