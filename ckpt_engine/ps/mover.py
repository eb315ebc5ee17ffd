"""Moving one bucket into its IPC slot on every rank: owner's host memory -> device slot ->
broadcast into the same slot on all ranks. No intermediate buffer, no second copy.

GPU: the owner's host-to-device copies (non-blocking, from pinned memory) and the NCCL
broadcast are queued on a side stream; ``launch`` returns at once with a CUDA event, and the
host waits on that event only right before telling the worker. CPU: the owner copies with
memcpy, the gloo broadcast runs asynchronously and ``wait`` joins it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ckpt_engine.errors import CollectiveError
from ckpt_engine.planner import Bucket
from ckpt_engine.ps.registry import RegisteredCheckpoint

logger = logging.getLogger(__name__)


def _wait_event(event: torch.cuda.Event, deadline: float) -> bool:
    """Wait for a CUDA event until ``deadline``; CUDA has no blocking wait with a timeout, so
    poll (a dead peer must not hang us inside cudaEventSynchronize)."""
    while not event.query():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0001)
    return True


@dataclass
class Launched:
    bucket: Bucket
    slot: int
    work: dist.Work | None = None  # CPU: the async gloo broadcast
    event: torch.cuda.Event | None = None  # GPU: recorded after the broadcast


class SlotMover:
    def __init__(
        self,
        *,
        device_type: str,
        device_index: int,
        rank: int,
        world_size: int,
        group: dist.ProcessGroup | None,
        buffer: torch.Tensor,
        slot_bytes: int,
        checkpoint: RegisteredCheckpoint | None,
    ) -> None:
        self.device_type = device_type
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.buffer = buffer
        self.slot_bytes = slot_bytes
        self.checkpoint = checkpoint
        self.stream = (
            torch.cuda.Stream(device=torch.device("cuda", device_index))
            if device_type == "cuda"
            else None
        )

    def slot_view(self, slot: int, nbytes: int) -> torch.Tensor:
        start = slot * self.slot_bytes
        return self.buffer[start : start + nbytes]

    def _copy_in(self, bucket: Bucket, view: torch.Tensor, non_blocking: bool) -> None:
        if bucket.owner != self.rank or not bucket.copies:
            return
        if self.checkpoint is None:
            raise RuntimeError(f"rank {self.rank} owns bucket {bucket.id} but holds no checkpoint")
        for c in bucket.copies:
            src = self.checkpoint.buffers[c.buffer].tensor[c.src : c.src + c.nbytes]
            view[c.dst : c.dst + c.nbytes].copy_(src, non_blocking=non_blocking)

    def launch(self, bucket: Bucket, slot: int) -> Launched:
        """Start moving ``bucket`` into ``slot``; returns without waiting for it."""
        view = self.slot_view(slot, bucket.nbytes)
        launched = Launched(bucket, slot)
        needs_broadcast = self.world_size > 1 and bucket.nbytes > 0
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                self._copy_in(bucket, view, non_blocking=True)
                if needs_broadcast:
                    dist.broadcast(view, src=bucket.owner, group=self.group, async_op=True).wait()
                launched.event = torch.cuda.Event()
                launched.event.record(self.stream)
        else:
            self._copy_in(bucket, view, non_blocking=False)
            if needs_broadcast:
                launched.work = dist.broadcast(
                    view, src=bucket.owner, group=self.group, async_op=True
                )
        return launched

    def wait(self, launched: Launched, timeout_s: float) -> None:
        """Block until the bucket is complete in the slot on this rank (at most ``timeout_s``)."""
        if launched.event is not None and not _wait_event(
            launched.event, time.monotonic() + timeout_s
        ):
            raise CollectiveError(
                f"rank {self.rank}: bucket {launched.bucket.id} did not arrive within {timeout_s} s",
                timed_out=True,
            )
        if launched.work is not None:
            try:
                launched.work.wait(timedelta(seconds=timeout_s))
            except RuntimeError as e:
                raise CollectiveError(
                    f"rank {self.rank}: broadcast of bucket {launched.bucket.id} failed: {e}"
                ) from e
            launched.work = None

    def drain(self, launched: list[Launched], timeout_s: float) -> bool:
        """Best effort after a failure: wait for outstanding moves. False if a device copy or
        broadcast may still be writing into the buffer (then it must not be freed). A CPU
        broadcast that failed or timed out holds its own reference to the shared-memory
        mapping, so unlinking the file stays safe."""
        deadline = time.monotonic() + timeout_s
        for item in launched:
            if item.event is not None and not _wait_event(item.event, deadline):
                return False
            if item.work is not None:
                try:
                    item.work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
                except RuntimeError as e:
                    logger.warning("rank %d: outstanding broadcast failed: %s", self.rank, e)
        return True
