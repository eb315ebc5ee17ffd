"""IPC buffers shared between a parameter-server rank and its colocated worker.

The PS owns one buffer per update: ``num_slots * slot_bytes`` bytes on its device, exported as
plain fields (a wire.ShmBuffer or wire.CudaBuffer), never pickled.

- GPU: a device tensor; its storage is exported with ``UntypedStorage._share_cuda_()`` (CUDA IPC
  memory handle, the producer's ref-counter handle, an event handle) and rebuilt by the worker
  with ``UntypedStorage._new_shared_cuda(...)`` on the worker's own device index, so the two
  processes may see different CUDA_VISIBLE_DEVICES orders.
- CPU: a shared-memory file (unguessable name, mode 0600) mapped by both; the PS unlinks it.
"""

from __future__ import annotations

import gc
import logging
import os
import stat
import time

import torch

from ckpt_engine import host_memory
from ckpt_engine.errors import ProtocolError
from ckpt_engine.wire import CudaBuffer, ShmBuffer

logger = logging.getLogger(__name__)

LINGER_S = 0.5  # longest wait for another holder (NCCL's watchdog) to drop the buffer


class IpcBuffer:
    """PS side: the owner of one update's IPC buffer; ``tensor`` is 1-D uint8 on the device."""

    def __init__(
        self, device_type: str, device_index: int, nbytes: int, *, shm_dir: str, label: str
    ):
        self.device_type = device_type
        self.device_index = device_index
        self.nbytes = nbytes
        self._host: host_memory.HostBuffer | None = None
        if device_type == "cuda":
            self._tensor: torch.Tensor | None = torch.empty(
                nbytes, dtype=torch.uint8, device=torch.device("cuda", device_index)
            )
            self.handle: ShmBuffer | CudaBuffer = _export_cuda(self._tensor)
        else:
            self._host = host_memory.create_shm(nbytes, shm_dir=shm_dir, label=f"{label}-ipc")
            self._tensor = self._host.tensor
            self.handle = ShmBuffer(path=self._host.path or "", nbytes=nbytes)

    @property
    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            raise RuntimeError("IPC buffer is closed")
        return self._tensor

    def close(self, *, collect: bool = True) -> None:
        """Free the buffer (GPU: after the device is idle; CPU: unlink the file). Idempotent.

        The caller must hold no other reference to the tensor. ``collect=False`` skips the
        full garbage collection (tens of ms once torch is imported), for the success path where
        no reference cycle can hold the buffer."""
        if self._tensor is None:
            return
        if self.device_type == "cuda":
            torch.cuda.synchronize(self.device_index)  # no copy may still touch it
            _wait_sole_owner(self._tensor, LINGER_S)
        self._tensor = None
        if self._host is not None:
            self._host.close()
            self._host = None
        if self.device_type == "cuda":
            if collect:
                gc.collect()
            torch.cuda.ipc_collect()  # frees the block once the worker's mapping is gone
            torch.cuda.empty_cache()  # and hands the memory back to the colocated engine


def _wait_sole_owner(tensor: torch.Tensor, timeout_s: float) -> None:
    """Wait (bounded) until nothing but ``tensor`` holds its storage: NCCL keeps the tensors of
    a collective until its watchdog thread sees the work complete, and memory freed after our
    ``empty_cache`` would stay in torch's cache instead of going back to the device."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return
    storage = tensor.untyped_storage()
    deadline = time.monotonic() + timeout_s
    while use_count(storage._cdata) > 2 and time.monotonic() < deadline:  # tensor + `storage`
        time.sleep(0.001)


def _export_cuda(tensor: torch.Tensor) -> CudaBuffer:
    (
        _device,
        handle,
        storage_size_bytes,
        storage_offset_bytes,
        ref_counter_handle,
        ref_counter_offset,
        event_handle,
        event_sync_required,
    ) = tensor.untyped_storage()._share_cuda_()
    return CudaBuffer(
        nbytes=tensor.numel(),
        handle=bytes(handle),
        storage_size_bytes=int(storage_size_bytes),
        storage_offset_bytes=int(storage_offset_bytes),
        ref_counter_handle=bytes(ref_counter_handle),
        ref_counter_offset=int(ref_counter_offset),
        event_handle=bytes(event_handle) if event_handle else b"",
        event_sync_required=bool(event_sync_required),
    )


def _open_cuda(handle: CudaBuffer, device_id: int) -> torch.Tensor:
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        device_id,
        handle.handle,
        handle.storage_size_bytes,
        handle.storage_offset_bytes,
        handle.ref_counter_handle,
        handle.ref_counter_offset,
        handle.event_handle,
        handle.event_sync_required,
    )
    if storage.nbytes() < handle.nbytes:
        raise ProtocolError(
            f"CUDA IPC storage has {storage.nbytes()} bytes, expected {handle.nbytes}"
        )
    tensor = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", device_id))
    return tensor.set_(storage, 0, (handle.nbytes,), (1,))


def _open_shm(handle: ShmBuffer) -> torch.Tensor:
    name = os.path.basename(handle.path)
    if not name.startswith(host_memory.FILE_PREFIX) or not os.path.isabs(handle.path):
        raise ProtocolError(f"refusing to map {handle.path!r}: not a ckpt-engine buffer")
    try:
        st = os.lstat(handle.path)
    except OSError as e:
        raise ProtocolError(f"cannot open IPC buffer {handle.path}: {e}") from e
    if not stat.S_ISREG(st.st_mode) or st.st_size != handle.nbytes:
        raise ProtocolError(
            f"IPC buffer {handle.path} is not a regular file of {handle.nbytes} bytes"
        )
    return torch.from_file(handle.path, shared=True, size=handle.nbytes, dtype=torch.uint8)


def open_ipc_buffer(handle: ShmBuffer | CudaBuffer, device_id: int) -> torch.Tensor:
    """Worker side: map the PS's buffer as a 1-D uint8 tensor (on ``cuda:device_id`` for GPU)."""
    if isinstance(handle, CudaBuffer):
        return _open_cuda(handle, device_id)
    return _open_shm(handle)


def release_ipc_buffer(device_type: str, device_id: int, *, collect: bool = True) -> None:
    """Worker side, after dropping every view: let the CUDA mapping go now rather than later.

    ``collect=False`` skips the full garbage collection (tens of ms in a process that imported
    torch, far more in a serving engine) when no reference cycle can hold a view."""
    if collect:
        gc.collect()
    if device_type == "cuda":
        torch.cuda.synchronize(device_id)
        torch.cuda.ipc_collect()
