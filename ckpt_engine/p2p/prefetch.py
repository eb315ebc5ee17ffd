"""A receiving rank's reads, ahead of the broadcast: a thread fills a ring of staging buffers.

The buckets this rank reads are fetched in plan order, each into a free staging buffer (host
memory, pinned on GPU), through one Reader per owner (opened on first use, in this thread).
``take(bucket)`` waits for a bucket to be staged; ``release(index)`` returns its buffer once
the copy out of it is complete. With ``depth`` buffers, a rank reads its next bucket while its
previous one is broadcast, so the receivers' reads (from different owners) overlap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ckpt_engine.errors import TransferError
from ckpt_engine.host_memory import HostBuffer
from ckpt_engine.p2p.transport import Reader, ReadRange
from ckpt_engine.planner import CopyRange

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fetch:
    """Bucket ``bucket`` is ``copies`` of owner ``owner``'s buffers (dst: offsets in the slot)."""

    bucket: int
    owner: int
    copies: tuple[CopyRange, ...]


class Prefetcher:
    def __init__(
        self,
        fetches: Sequence[Fetch],
        staging: Sequence[HostBuffer],
        open_reader: Callable[[int], Reader],
        *,
        rank: int,
    ) -> None:
        self.fetches = list(fetches)
        self.staging = list(staging)
        self.open_reader = open_reader
        self.rank = rank
        self._cond = threading.Condition()
        self._free = list(range(len(staging)))
        self._ready: dict[int, int] = {}  # bucket -> staging index
        self._error: BaseException | None = None
        self._stop = False
        self.read_bytes = 0
        self.read_s = 0.0
        self._thread = threading.Thread(
            target=self._run, name=f"ckpt-engine-p2p-fetch-r{rank}", daemon=True
        )
        if self.fetches:
            self._thread.start()

    def _run(self) -> None:
        readers: dict[int, Reader] = {}
        try:
            for fetch in self.fetches:
                with self._cond:
                    self._cond.wait_for(lambda: self._free or self._stop)
                    if self._stop:
                        return
                    index = self._free.pop(0)
                reader = readers.get(fetch.owner)
                if reader is None:
                    reader = readers[fetch.owner] = self.open_reader(fetch.owner)
                    reader.prepare(self.staging)
                view = self.staging[index].memoryview()
                start = time.monotonic()
                self.read_bytes += reader.read(
                    [
                        ReadRange(
                            c.buffer,
                            c.src,
                            c.nbytes,
                            view[c.dst : c.dst + c.span],
                            c.count,
                            c.stride,
                        )
                        for c in fetch.copies
                        if c.nbytes
                    ]
                )
                self.read_s += time.monotonic() - start
                with self._cond:
                    self._ready[fetch.bucket] = index
                    self._cond.notify_all()
        except BaseException as e:
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            for reader in readers.values():
                try:
                    reader.close()
                except Exception as e:
                    logger.warning("rank %d: closing a P2P reader: %s", self.rank, e)

    def take(self, bucket: int, timeout_s: float) -> int:
        """The staging index holding ``bucket``; raises the read's error, or on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: bucket in self._ready or self._error is not None, timeout_s)
            if bucket in self._ready:
                return self._ready.pop(bucket)
            if self._error is not None:
                if isinstance(self._error, TransferError):
                    raise self._error
                raise TransferError(f"P2P read failed: {self._error!r}") from self._error
            raise TransferError(
                f"rank {self.rank}: bucket {bucket} was not read within {timeout_s} s",
                timed_out=True,
            )

    def release(self, index: int) -> None:
        with self._cond:
            self._free.append(index)
            self._cond.notify_all()

    def stop(self, timeout_s: float) -> bool:
        """Stop after the read in progress (bounded by the reader's own timeout); True if the
        thread ended, so that the staging buffers may be freed."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()
