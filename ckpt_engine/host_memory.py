"""Host buffers: the memory owner of registered checkpoints (and of CPU IPC buffers).

A HostBuffer is one host memory region seen as a 1-D uint8 tensor. Kinds:

- ``shm``: a file in the shared-memory directory (``/dev/shm``), created exclusively with mode
  0600 and an unguessable name, space reserved up front (a full /dev/shm is an error here, not
  a SIGBUS later), mapped shared; unlinked on close. Another process (a later P2P server) can map
  it by path.
- ``anonymous`` (the default, `PSConfig.host_memory`): private process memory with transparent
  huge pages; needs no room in /dev/shm (often 64 MiB in a container).
- ``in_place``: an existing file (a checkpoint already in /dev/shm) mapped shared; never unlinked.

Files are named ``ckpt-engine-<run id>-r<rank>-<label>-<random token>``: a process killed with
SIGKILL cannot unlink them, and the run id (logged at start) tells an operator which to remove;
we never delete files we did not create.

On GPU machines a buffer is pinned with cudaHostRegister so that host-to-device copies are
asynchronous DMA, and unpinned before it is unmapped. Exact sizes: no power-of-two rounding as in
torch's pinned-memory cache.

Pinning speed (issue 6; `bench/register.py` and `bench/run.py` on H200 hosts, 17.4 GB in 45 files,
16 threads; see bench/RESULTS.md): cudaHostRegister of a mapping whose page tables are empty
faults every 4 KiB page in itself and barely scales with threads (1.7-1.8 s in place). So
`pin_all` first fills the page tables with MADV_POPULATE_WRITE, in 64 MiB chunks of all buffers
on one thread pool, and only then registers each buffer (0.8-1.1 s in place, once the pages have
been mapped before; 1.6 s in `bench/run.py` right after the files were written). Anonymous
buffers are private mappings that start on a 2 MiB boundary and are advised to use transparent
huge pages: fresh memory then populates and pins faster than 4 KiB pages or /dev/shm files
(files read into fresh memory: 1.6-2.4 s anonymous vs 2.7-3.9 s shm, same runs).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

logger = logging.getLogger(__name__)

FILE_PREFIX = "ckpt-engine-"
POPULATE_CHUNK_BYTES = 64 << 20
HUGE_PAGE_BYTES = 2 << 20
MADV_POPULATE_WRITE = 23  # Linux >= 5.14; not in Python's mmap module before 3.13
HUGE_PAGES = True  # advise anonymous buffers to use transparent huge pages (bench/register.py)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_populate_supported = True


def _populate_range(addr: int, nbytes: int) -> None:
    """Fault in and map every page of [addr, addr + nbytes) for writing (ctypes releases the GIL
    for the call, so chunks run in parallel). A kernel without MADV_POPULATE_WRITE leaves the
    faults to cudaHostRegister (slower, same result)."""
    global _populate_supported
    if not _populate_supported or nbytes == 0:
        return
    if _libc.madvise(ctypes.c_void_p(addr), nbytes, MADV_POPULATE_WRITE) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EINVAL:
        _populate_supported = False
        logger.info("MADV_POPULATE_WRITE unsupported by this kernel: pinning faults pages itself")
        return
    raise OSError(code, f"populating {nbytes} bytes of host memory failed: {os.strerror(code)}")


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

    def populate_chunks(self) -> list[tuple[int, int]]:
        """(address, bytes) ranges covering the buffer, for `_populate_range`."""
        base = self.tensor.data_ptr()
        return [
            (base + start, min(POPULATE_CHUNK_BYTES, self.nbytes - start))
            for start in range(0, self.nbytes, POPULATE_CHUNK_BYTES)
        ]

    def pin(self, *, populated: bool = False) -> None:
        """cudaHostRegister the buffer (its page tables filled first unless `populated`)."""
        if not self.pinned and self.nbytes > 0:
            if not populated:
                for addr, nbytes in self.populate_chunks():
                    _populate_range(addr, nbytes)
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
    """Private anonymous memory (not shared: shared anonymous memory is shmem, where transparent
    huge pages follow the stricter shmem setting), advised to use transparent huge pages. The
    mapping lives as long as the tensor and its views."""
    if nbytes == 0:
        tensor = torch.empty(0, dtype=torch.uint8)
    else:
        # One huge page more, so that the buffer can start on a huge-page boundary (every
        # 2 MiB of it is then eligible).
        region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE)
        if HUGE_PAGES:
            with contextlib.suppress(OSError, AttributeError):  # THP off or absent: 4 KiB pages
                region.madvise(mmap.MADV_HUGEPAGE)
        whole = torch.frombuffer(region, dtype=torch.uint8)
        skip = -whole.data_ptr() % HUGE_PAGE_BYTES
        tensor = whole[skip : skip + nbytes]
    return HostBuffer(tensor, kind="anonymous", path=None, owns_file=False)


def pin_all(buffers: Sequence[HostBuffer], *, threads: int) -> tuple[float, float]:
    """Pin `buffers` on `threads` threads: first every page table filled (all buffers' chunks on
    one pool, so a few large files populate as fast as many small ones), then one
    cudaHostRegister per buffer, against the caller's current CUDA device. If one fails, those
    pinned here are unpinned and the error raised; the buffers stay open (the caller owns them).
    Returns the seconds spent populating and registering.
    """
    todo = [b for b in buffers if not b.pinned and b.nbytes > 0]
    if not todo:
        return 0.0, 0.0
    device_index = torch.cuda.current_device()
    start = time.perf_counter()

    def pin(buf: HostBuffer) -> None:
        torch.cuda.set_device(device_index)  # a new thread's default is device 0
        buf.pin(populated=True)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        _populate_on(pool, todo)
        populated = time.perf_counter()
        futures = [pool.submit(pin, b) for b in todo]
        error = None
        for future in futures:
            try:
                future.result()
            except BaseException as e:
                error = error or e
    if error is not None:
        for buf in todo:
            if buf.pinned:
                _cuda_unpin(buf.tensor)
                buf.pinned = False
        raise error
    return populated - start, time.perf_counter() - populated


def _populate_on(pool: ThreadPoolExecutor, buffers: Sequence[HostBuffer]) -> None:
    chunks = [c for b in buffers for c in b.populate_chunks()]
    for future in [pool.submit(_populate_range, *c) for c in chunks]:
        future.result()


def populate_all(buffers: Sequence[HostBuffer], *, threads: int) -> float:
    """Fill the page tables of ``buffers`` (pages already there are kept: cheap for buffers
    reused from the pool), in 64 MiB chunks on ``threads`` threads; returns the seconds.
    Unpinned buffers before process_vm_writev fills them (ckpt_engine.ps.hostcopy), which
    faults missing pages in one at a time: 150,000 x 16 KiB on CPU took 5.3 s that way,
    against about 0.4 s populating plus 0.4 s copying."""
    start = time.perf_counter()
    todo = [b for b in buffers if b.nbytes > 0]
    if (len(todo) == 1 and todo[0].nbytes <= POPULATE_CHUNK_BYTES) or threads <= 1:
        for b in todo:
            for c in b.populate_chunks():
                _populate_range(*c)
    elif todo:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            _populate_on(pool, todo)
    return time.perf_counter() - start


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
