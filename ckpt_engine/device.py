"""Device keys and device selection.

A device key names one accelerator the same way on the parameter-server side and the inference
side, so that ``dict(socket_paths)[device_key(i)]`` finds a worker's socket:

- GPU: ``GPU-<uuid>`` with the UUID as ``torch.cuda.get_device_properties(i).uuid`` prints it
  (the keys vLLM's ``get_device_uuid`` and SGLang use; nvidia-smi prints the same).
- CPU: ``CPU-<host>-<index>``, where host is CKPT_ENGINE_HOSTNAME or the hostname and index is
  the device index (the local rank). Stable for a given host and local rank.

The device type is ``cuda`` when a GPU is visible, else ``cpu``; CKPT_ENGINE_DEVICE or an
explicit argument overrides it (``cpu`` runs the CPU path on a GPU machine).
"""

from __future__ import annotations

import logging
import os

import torch

from ckpt_engine import env

logger = logging.getLogger(__name__)


def resolve_device_type(requested: str | None = None) -> str:
    """``cpu`` or ``cuda``: the argument, else CKPT_ENGINE_DEVICE, else what is available."""
    chosen = requested if requested is not None else env.device_type()
    if chosen is None:
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
    if chosen not in ("cpu", "cuda"):
        raise ValueError(f"device type must be 'cpu' or 'cuda', got {chosen!r}")
    if chosen == "cuda" and not torch.cuda.is_available():
        raise ValueError("device type 'cuda' requested but no CUDA device is visible")
    return chosen


def device_key(index: int | None = None, *, device_type: str | None = None) -> str:
    """The key of device ``index`` (default: the current CUDA device, or 0 on CPU)."""
    kind = resolve_device_type(device_type)
    if kind == "cuda":
        if index is None:
            index = torch.cuda.current_device()
        return f"GPU-{torch.cuda.get_device_properties(index).uuid}"
    return f"CPU-{env.hostname()}-{0 if index is None else index}"


def index_for(device_type: str, local_rank: int) -> int:
    """The device index of the rank with this LOCAL_RANK (a single visible GPU: 0)."""
    if device_type != "cuda":
        return local_rank
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK {local_rank} but only {count} GPUs are visible")
    return local_rank


def torch_device(device_type: str, index: int) -> torch.device:
    return torch.device("cuda", index) if device_type == "cuda" else torch.device("cpu")


def free_bytes(device_type: str, index: int) -> int:
    """Memory available for IPC buffers: free GPU memory, or free space in the shm directory."""
    if device_type == "cuda":
        free, _total = torch.cuda.mem_get_info(index)
        return int(free)
    st = os.statvfs(env.shm_dir())
    return int(st.f_bavail * st.f_frsize)


def synchronize(device_type: str, index: int) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize(index)
