"""Compatibility with the upstream checkpoint-engine (MoonshotAI/checkpoint-engine 0.4.x).

Opt-in only: ``ParameterServer.update(..., wire="upstream")`` drives inference engines that run
upstream's ``checkpoint_engine.worker.update_weights_from_ipc`` (SGLang, vLLM with
``VllmColocateWorkerExtension``), and ``update_weights_from_ipc(..., wire="upstream")`` (or
CKPT_ENGINE_WIRE=upstream on the inference side) accepts an upstream ``ParameterServer``.

The upstream wire pickles every message and uses a predictable Linux abstract socket name that
any local process can bind or connect to (abstract names have no file permissions). So a local
process of any user can take the parameter server's socket name first, or connect to it, and
then read the CUDA IPC handle or feed a worker pickles; upstream's own worker unpickles them,
which runs that process's code inside the inference server. Our own wire exists for that reason
(JSON, private 0700 socket directory, random names). Use this mode only on hosts where every
local process is trusted. Our worker in this mode unpickles through an allowlist of the globals
the upstream wire uses, which removes the code execution but not the impersonation.
"""

from __future__ import annotations

import logging

WIRES = ("ckpt-engine", "upstream")

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def check_wire(wire: str) -> str:
    """``wire`` if it names a supported wire; ValueError listing them otherwise."""
    if wire not in WIRES:
        raise ValueError(f"unknown wire {wire!r}; supported: {', '.join(WIRES)}")
    return wire


def warn_upstream(side: str) -> None:
    """Log, once per process and side, what opting into the upstream wire risks."""
    if side in _warned:
        return
    _warned.add(side)
    logger.warning(
        "ckpt-engine %s uses the upstream checkpoint-engine wire (opted in): pickled messages "
        "over a predictable abstract socket (ipc://@checkpoint-engine-<uuid>-<n>.sock). Any local "
        "process can bind or connect to that name first and, against an upstream worker, run "
        "its code in the inference server. Use it only where every local process is trusted; "
        "our own wire (the default) has no such exposure.",
        side,
    )
