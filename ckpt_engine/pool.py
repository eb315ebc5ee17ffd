"""HostPool: host buffers kept across registrations, so that a training step's new checkpoint
lands in memory that is already mapped, populated and pinned (issue 18).

Registering a checkpoint every step used to map, populate and cudaHostRegister all of its
bytes every time (0.9-1.5 s for 16 GB on an H200 host), although the new checkpoint has the
same shapes as the last one. With the pool, `Registry.unregister` hands the buffers back here
and the next registration takes them again: for every buffer it needs (one per file, one per
chunk of named tensors) it gets the smallest free buffer at least that large (best fit), and
allocates a new one only when none fits. A checkpoint of the same size or smaller than the one
before therefore registers without a single mmap, page fault or cudaHostRegister.

Bounds and release:
- the free buffers never hold more than ``max_bytes`` (``PSConfig.host_pool_bytes``,
  CKPT_ENGINE_HOST_POOL_BYTES; 0 turns pooling off): a buffer handed back past the bound is
  unpinned and unmapped at once, as before the pool;
- buffers in use count against nothing here (they are the registered checkpoints);
- `close` frees every free buffer (`ParameterServer.close`); buffers still leased are freed
  when their lease closes.

Only ``anonymous`` buffers (the default host memory) are pooled: ``shm`` buffers are files an
operator sees in /dev/shm and expects gone after an unregister, and ``in_place`` buffers are
the user's own files.
"""

from __future__ import annotations

import logging
import threading

from ckpt_engine import host_memory
from ckpt_engine.host_memory import HostBuffer

logger = logging.getLogger(__name__)

POOLED_KINDS = ("anonymous",)


class PooledBuffer(HostBuffer):
    """A lease of the first ``nbytes`` of a pool buffer; ``close`` hands the buffer back.

    Pinning a lease pins the whole underlying buffer, so the pin outlives the lease."""

    def __init__(self, base: HostBuffer, nbytes: int, pool: HostPool) -> None:
        super().__init__(base.tensor[:nbytes], kind=base.kind, path=base.path, owns_file=False)
        self.base = base
        self.pinned = base.pinned
        self._pool = pool

    def populate_chunks(self) -> list[tuple[int, int]]:
        return self.base.populate_chunks()

    def pin(self, *, populated: bool = False) -> None:
        self.base.pin(populated=populated)
        self.pinned = self.base.pinned

    def close(self) -> None:
        if self.closed:
            return
        self._tensor = None
        # pin_all may have unpinned the region after a failure: the lease's flag is the truth
        self.base.pinned = self.pinned
        self._pool.give_back(self.base)


class HostPool:
    """Free host buffers of one kind, by best fit; thread-safe (the read threads allocate)."""

    def __init__(self, *, kind: str, shm_dir: str, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.kind = kind
        self.max_bytes = max_bytes if kind in POOLED_KINDS else 0
        self._shm_dir = shm_dir
        self._free: list[HostBuffer] = []
        self._lock = threading.Lock()
        self._closed = False
        self.reused = 0  # leases served from free buffers (for logs and tests)
        self.allocated = 0  # buffers newly allocated
        self.allocated_bytes = 0  # their bytes
        self._held = 0  # bytes of this pool's buffers still mapped (leased or free)

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._free)

    @property
    def held_bytes(self) -> int:
        """Host memory of this pool's buffers, leased (registered) or free."""
        with self._lock:
            return self._held

    def free_buffers(self) -> list[HostBuffer]:
        with self._lock:
            return list(self._free)

    def take(self, nbytes: int, *, label: str) -> HostBuffer:
        """A buffer of exactly ``nbytes`` bytes: a lease of a free one, else a new one (a new
        buffer is leased too when pooling is on, so it comes back here on close)."""
        if self.max_bytes == 0 or nbytes == 0:
            return host_memory.allocate(
                nbytes, kind=self.kind, shm_dir=self._shm_dir, label=label, pin=False
            )
        with self._lock:
            fits = [b for b in self._free if b.nbytes >= nbytes]
            base = min(fits, key=lambda b: b.nbytes) if fits else None
            if base is not None:
                self._free.remove(base)
                self.reused += 1
        if base is None:
            base = host_memory.allocate(
                nbytes, kind=self.kind, shm_dir=self._shm_dir, label=label, pin=False
            )
            with self._lock:
                self.allocated += 1
                self.allocated_bytes += base.nbytes
                self._held += base.nbytes
        return PooledBuffer(base, nbytes, self)

    def give_back(self, base: HostBuffer) -> None:
        """Keep ``base`` for a later lease, or free it when that would pass the bound."""
        with self._lock:
            keep = (
                not self._closed
                and sum(b.nbytes for b in self._free) + base.nbytes <= self.max_bytes
            )
            if keep:
                self._free.append(base)
            else:
                self._held -= base.nbytes
        if not keep:
            base.close()

    def trim(self) -> int:
        """Free every free buffer now (the watching updater, after a push: the pool then holds
        exactly what is registered); returns the bytes freed."""
        with self._lock:
            free, self._free = self._free, []
            freed = sum(b.nbytes for b in free)
            self._held -= freed
        for base in free:
            base.close()
        return freed

    def close(self) -> None:
        """Free every free buffer; leases still out are freed when they close."""
        with self._lock:
            self._closed = True
        free = len(self.free_buffers())
        self.trim()
        if free:
            logger.info("host pool: freed %d buffers", free)
