"""Host buffers: the memory owner of registered checkpoints (and of CPU IPC buffers).

A HostBuffer is one host memory region seen as a 1-D uint8 tensor. Kinds:

- ``shm``: a file in the shared-memory directory (``/dev/shm``), created exclusively with mode
  0600 and an unguessable name, space reserved up front (a full /dev/shm is an error here, not
  a SIGBUS later), mapped shared; unlinked on close. Another process (a later P2P server) can map
  it by path.
- ``anonymous``: private process memory, for machines whose /dev/shm is too small.
- ``in_place``: an existing file (a checkpoint already in /dev/shm) mapped shared; never unlinked.

Files are named ``ckpt-engine-<run id>-r<rank>-<label>-<random token>``: a process killed with
SIGKILL cannot unlink them, and the run id (logged at start) tells an operator which to remove;
we never delete files we did not create.

On GPU machines a buffer is pinned with cudaHostRegister so that host-to-device copies are
asynchronous DMA, and unpinned before it is unmapped. Exact sizes: no power-of-two rounding as in
torch's pinned-memory cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets

import torch

logger = logging.getLogger(__name__)

FILE_PREFIX = "ckpt-engine-"


def _cuda_pin(tensor: torch.Tensor) -> None:
    # cudaHostRegister needs a CUDA context on this thread's current device (a worker thread of
    # the parallel reader may not have one yet), so initialize it first.
    torch.cuda.init()
    torch.cuda.set_device(torch.cuda.current_device())
    cudart = torch.cuda.cudart()
    code = cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel(), 0)
    if int(code) != 0:
        cudart.cudaGetLastError()  # clear it, or torch reports it at its next CUDA call
        raise OSError(
            f"cudaHostRegister of {tensor.numel()} bytes failed with CUDA error {int(code)}"
        )


def _cuda_unpin(tensor: torch.Tensor) -> None:
    code = torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
    if int(code) != 0:
        logger.warning("cudaHostUnregister failed with CUDA error %s", code)


class HostBuffer:
    """One host memory region; ``tensor`` is a 1-D uint8 view of all of it."""

    def __init__(
        self, tensor: torch.Tensor, *, kind: str, path: str | None, owns_file: bool
    ) -> None:
        self._tensor: torch.Tensor | None = tensor
        self.kind = kind
        self.path = path
        self.nbytes = tensor.numel()
        self.pinned = False
        self._owns_file = owns_file

    @property
    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            raise RuntimeError(f"host buffer {self.path or self.kind} is closed")
        return self._tensor

    @property
    def closed(self) -> bool:
        return self._tensor is None

    def memoryview(self) -> memoryview:
        """A writable memoryview of the whole buffer (for reads straight into it)."""
        return memoryview(self.tensor.numpy()).cast("B")

    def pin(self) -> None:
        if not self.pinned and self.nbytes > 0:
            _cuda_pin(self.tensor)
            self.pinned = True

    def close(self) -> None:
        """Unpin, unmap and (for owned shared-memory files) unlink. Idempotent."""
        if self._tensor is None:
            return
        if self.pinned:
            _cuda_unpin(self._tensor)
            self.pinned = False
        self._tensor = None
        if self._owns_file and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __repr__(self) -> str:
        return f"HostBuffer(kind={self.kind!r}, nbytes={self.nbytes}, path={self.path!r})"


def shm_file_name(label: str) -> str:
    """An unguessable file name carrying our prefix and a human-readable label."""
    return f"{FILE_PREFIX}{label}-{secrets.token_hex(16)}"


def create_shm(nbytes: int, *, shm_dir: str, label: str) -> HostBuffer:
    """A fresh shared-memory file of ``nbytes`` bytes, mapped shared."""
    if nbytes == 0:
        return HostBuffer(torch.empty(0, dtype=torch.uint8), kind="shm", path=None, owns_file=False)
    path = os.path.join(shm_dir, shm_file_name(label))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            raise OSError(
                e.errno, f"cannot reserve {nbytes} bytes in {shm_dir}: {e.strerror}"
            ) from e
        tensor = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return HostBuffer(tensor, kind="shm", path=path, owns_file=True)


def create_anonymous(nbytes: int) -> HostBuffer:
    return HostBuffer(
        torch.empty(nbytes, dtype=torch.uint8), kind="anonymous", path=None, owns_file=False
    )


def _pinned(buf: HostBuffer) -> HostBuffer:
    """``buf`` pinned; closed if pinning fails."""
    try:
        buf.pin()
    except BaseException:
        buf.close()
        raise
    return buf


def allocate(nbytes: int, *, kind: str, shm_dir: str, label: str, pin: bool) -> HostBuffer:
    """A new buffer of the given kind (``shm`` or ``anonymous``), pinned when asked."""
    if kind == "shm":
        buf = create_shm(nbytes, shm_dir=shm_dir, label=label)
    elif kind == "anonymous":
        buf = create_anonymous(nbytes)
    else:
        raise ValueError(f"unknown host memory kind {kind!r}; supported: shm, anonymous")
    return _pinned(buf) if pin else buf


def in_shm_dir(path: str, shm_dir: str) -> bool:
    """Whether ``path`` (after resolving links) is a file directly usable in place."""
    real = os.path.realpath(path)
    root = os.path.realpath(shm_dir)
    return real.startswith(root + os.sep) and os.access(real, os.R_OK | os.W_OK)


def map_in_place(path: str, *, pin: bool) -> HostBuffer:
    """Map an existing file (whole) shared, without copying; the file is never unlinked by us.

    The file must not change while it is registered.
    """
    size = os.stat(path).st_size
    tensor = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
    buf = HostBuffer(tensor, kind="in_place", path=path, owns_file=False)
    return _pinned(buf) if pin else buf
