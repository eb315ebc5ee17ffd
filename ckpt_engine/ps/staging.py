"""StagedReads: a checkpoint's file reads running in the background while its update runs.

`ParameterServer.register_and_update` registers a checkpoint without waiting for its bytes:
the headers are parsed and the (pooled, pinned) buffers taken at once, the reads start here on
the read threads in file order, in chunks of READ_CHUNK_BYTES, and the update's mover waits
only for the byte ranges of the bucket it copies next (`wait_range`), then copies each run at
once. (On 1x H200, 16 GiB a step: 8-16 MiB chunks were no faster than 64 MiB; a device copy per
1-4 MiB chunk, to send bytes still in the CPU's cache, was slower, 0.9-1.3 s against 0.50-0.59
s: the mover thread then contends with the read threads.) So the host-to-device
copies and broadcasts of the buckets already read overlap the reads of the later ones, and a
step costs about max(read, transfer) instead of their sum. When every chunk has landed the
host copy is complete, as after a plain registration (P2P serving, the next update).

A failed read (a truncated file, an I/O error) is kept and raised by every later wait, as the
CheckpointFileError naming the file; `close` stops the reads that have not started and waits
for those running, so a buffer never goes back to the pool with a read still writing into it.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ckpt_engine.errors import CheckpointFileError
from ckpt_engine.safetensors_io import READ_CHUNK_BYTES, ReadJob, _pread_exact


class StagedReads:
    """Reads of whole buffers (``jobs[i]`` fills buffer ``buffers[i]`` from its offset 0)."""

    def __init__(self, jobs: list[ReadJob], buffers: list[int], *, threads: int) -> None:
        self._cond = threading.Condition()
        self._pending: dict[int, set[int]] = {}  # buffer -> chunk indices not read yet
        self._paths: dict[int, str] = {}
        self._error: BaseException | None = None
        self._stopped = False
        self._fds: dict[str, int] = {}
        chunks = []
        for job, buffer in zip(jobs, buffers):
            count = -(-len(job.dest) // READ_CHUNK_BYTES)
            self._pending[buffer] = set(range(count))
            self._paths[buffer] = job.path
            chunks.extend((job, buffer, k) for k in range(count))
        self._left = len(chunks)
        self.started = time.perf_counter()
        self.finished: float | None = None  # when the last chunk landed (perf_counter)
        self.waited_s = 0.0  # time the update's mover spent waiting for bytes (wait_range)
        try:
            for job in jobs:
                if job.path not in self._fds:
                    self._fds[job.path] = os.open(job.path, os.O_RDONLY)
        except OSError as e:
            self._close_fds()
            raise CheckpointFileError(job.path, f"cannot open: {e}") from e
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="staged")
        for chunk in chunks:
            self._pool.submit(self._read, *chunk)
        if not chunks:
            self._close_fds()

    def _read(self, job: ReadJob, buffer: int, k: int) -> None:
        start = k * READ_CHUNK_BYTES
        with self._cond:
            skip = self._stopped or self._error is not None
        if not skip:
            dest = job.dest[start : start + READ_CHUNK_BYTES]
            try:
                _pread_exact(self._fds[job.path], job.path, dest, job.offset + start)
            except CheckpointFileError as e:
                self._fail(e)
            except OSError as e:
                self._fail(CheckpointFileError(job.path, f"read failed at byte {start}: {e}"))
        with self._cond:
            if not skip:
                self._pending[buffer].discard(k)
            self._left -= 1
            done = self._left == 0
            if done:
                self.finished = time.perf_counter()
            self._cond.notify_all()
        if done:
            self._close_fds()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = self._error or error
            self._cond.notify_all()

    def _close_fds(self) -> None:
        with self._cond:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def _wait(self, ready, what: str, deadline: float) -> None:
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if ready():
                    return
                if self._stopped:
                    raise CheckpointFileError(what, "reads stopped (checkpoint unregistered)")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckpointFileError(what, "reading it did not finish in time")
                self._cond.wait(min(left, 1.0))

    def wait_range(self, buffer: int, start: int, end: int, deadline: float) -> None:
        """Until bytes [start, end) of ``buffer`` are read; raises the first read error."""
        pending = self._pending.get(buffer)
        if pending is None or end <= start:
            return
        first, last = start // READ_CHUNK_BYTES, (end - 1) // READ_CHUNK_BYTES
        t0 = time.perf_counter()
        try:
            self._wait(
                lambda: not any(k in pending for k in range(first, last + 1)),
                self._paths[buffer],
                deadline,
            )
        finally:
            self.waited_s += time.perf_counter() - t0

    def wait_all(self, deadline: float) -> None:
        """Until every read landed (the host copy is complete); raises the first read error."""
        self._wait(lambda: self._left == 0, "checkpoint files", deadline)

    @property
    def complete(self) -> bool:
        with self._cond:
            return self._left == 0 and self._error is None

    def close(self) -> None:
        """Skip the reads not started, wait for those running. Idempotent."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._pool.shutdown(wait=True)
        self._close_fds()
