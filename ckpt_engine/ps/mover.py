"""Moving one bucket into its IPC slot on every rank: owner's host memory -> device slot ->
broadcast into the same slot on all ranks. No intermediate buffer, no second copy. (In
``register_and_update``, named tensors on the owner's own device are copied into the slot from
where they are, device-to-device, not from host memory: ckpt_engine.ps.direct.)

GPU: two side streams. The owner's host-to-device copies (non-blocking, from pinned memory) go
on ``h2d``; the NCCL broadcast goes on ``comm`` after an event of those copies (world size 1:
no broadcast, no ``comm``). ``launch`` returns at once with an event recorded after the last
step; the host waits on it only right before telling the worker. With the copies and the
broadcasts on separate streams, each rank's copy engine loads its own next bucket while the
broadcast of another rank's bucket runs, so the ranks' host-to-device links work in parallel.
Each slot remembers the event of the last bucket that landed in it: the next copy into that
slot waits on it (GPU side), so a bucket launched ahead never overwrites one still being
broadcast. That the worker is done with a slot is the driver's business (its Ack).

CPU: the owner copies with memcpy, the gloo broadcast runs asynchronously and ``wait`` joins it.

``max_in_flight``: how many buckets the driver may launch before waiting for the first (one
per slot).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
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
    error: BaseException | None = None  # the owner's copy failed: raised by ``wait``


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
        timeout_s: float = 300.0,
    ) -> None:
        self.device_type = device_type
        self.timeout_s = timeout_s
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.buffer = buffer
        self.slot_bytes = slot_bytes
        self.checkpoint = checkpoint
        self.max_in_flight = max(1, buffer.numel() // slot_bytes) if slot_bytes else 1
        self._last: dict[int, Launched] = {}  # the last bucket launched into each slot
        self.stream: torch.cuda.Stream | None = None  # h2d copies
        self.comm_stream: torch.cuda.Stream | None = None  # broadcasts
        if device_type == "cuda":
            dev = torch.device("cuda", device_index)
            self.stream = torch.cuda.Stream(device=dev)
            if world_size > 1:
                self.comm_stream = torch.cuda.Stream(device=dev)

    def slot_view(self, slot: int, nbytes: int) -> torch.Tensor:
        start = slot * self.slot_bytes
        return self.buffer[start : start + nbytes]

    def _copy_in(self, bucket: Bucket, view: torch.Tensor, non_blocking: bool) -> bool:
        """Owner only: copy the bucket's runs from host memory into ``view``; True if it did."""
        if bucket.owner != self.rank or not bucket.copies:
            return False
        if self.checkpoint is None:
            raise RuntimeError(f"rank {self.rank} owns bucket {bucket.id} but holds no checkpoint")
        reads = self.checkpoint.reads  # register_and_update: reads may still be running
        direct = self.checkpoint.direct  # and named tensors read where they are (ps/direct.py)
        deadline = time.monotonic() + self.timeout_s
        for c in bucket.copies:
            if direct is not None and direct.covers(c.buffer):
                direct.fill(view, c.buffer, c.src, c.dst, c.nbytes, deadline)
                continue
            if reads is not None:  # one copy per run once all of it is read (ps/staging.py)
                reads.wait_range(c.buffer, c.src, c.src + c.nbytes, deadline)
            src = self.checkpoint.buffers[c.buffer].tensor[c.src : c.src + c.nbytes]
            view[c.dst : c.dst + c.nbytes].copy_(src, non_blocking=non_blocking)
        return True

    def launch(self, bucket: Bucket, slot: int) -> Launched:
        """Start moving ``bucket`` into ``slot``; returns without waiting for it."""
        view = self.slot_view(slot, bucket.nbytes)
        launched = Launched(bucket, slot)
        needs_broadcast = self.world_size > 1 and bucket.nbytes > 0
        previous = self._last.get(slot)
        self._last[slot] = launched
        if self.stream is not None:
            self._launch_cuda(launched, view, previous, needs_broadcast)
            return launched
        if previous is not None and previous.work is not None:
            # normally joined already; after a failure, never write under a running send
            work, previous.work = previous.work, None
            work.wait(timedelta(seconds=self.timeout_s))
        try:
            self._copy_in(bucket, view, non_blocking=False)
        except Exception as e:  # broadcast anyway: the other ranks are in it
            launched.error = e
        if needs_broadcast:
            launched.work = dist.broadcast(view, src=bucket.owner, group=self.group, async_op=True)
        return launched

    def _launch_cuda(
        self,
        launched: Launched,
        view: torch.Tensor,
        previous: Launched | None,
        needs_broadcast: bool,
    ) -> None:
        h2d, comm = self.stream, self.comm_stream
        bucket = launched.bucket
        done: torch.cuda.Event | None = None
        if bucket.owner == self.rank and bucket.copies:
            with torch.cuda.stream(h2d):
                if previous is not None and previous.event is not None:
                    h2d.wait_event(previous.event)  # the slot's last bucket has left it
                try:
                    self._copy_in(bucket, view, non_blocking=True)
                except Exception as e:  # broadcast anyway: the other ranks are in it
                    launched.error = e
                done = torch.cuda.Event()
                done.record(h2d)
        if needs_broadcast:  # the comm stream keeps the slots' broadcasts in order
            with torch.cuda.stream(comm):
                if done is not None:
                    comm.wait_event(done)
                work = dist.broadcast(view, src=bucket.owner, group=self.group, async_op=True)
                work.wait()  # orders the comm stream after the broadcast; the host goes on
                done = torch.cuda.Event()
                done.record(comm)
        if done is None:  # nothing to move (an empty bucket)
            done = torch.cuda.Event()
            done.record(h2d)
        launched.event = done

    def wait(self, launched: Launched, timeout_s: float) -> None:
        """Block until the bucket is complete in the slot on this rank (at most ``timeout_s``)."""
        await_landing(launched, self.rank, timeout_s)
        finish_move(launched, self.rank, timeout_s)

    def drain(self, launched: list[Launched], timeout_s: float) -> bool:
        """Best effort after a failure: wait for outstanding moves. False if a device copy or
        broadcast may still be writing into the buffer (then it must not be freed). A CPU
        broadcast that failed or timed out holds its own reference to the shared-memory
        mapping, so unlinking the file stays safe."""
        return drain_moves(launched, self.rank, timeout_s)


def await_landing(launched: Launched, rank: int, timeout_s: float) -> None:
    """Wait (host side, polled) for the event recorded after the bucket's device work."""
    if launched.event is not None and not _wait_event(launched.event, time.monotonic() + timeout_s):
        raise CollectiveError(
            f"rank {rank}: bucket {launched.bucket.id} did not arrive within {timeout_s} s",
            timed_out=True,
        )


def finish_move(launched: Launched, rank: int, timeout_s: float) -> None:
    """Wait for the bucket's CPU broadcast (if any), then raise the launch's own error."""
    if launched.work is not None:
        try:
            launched.work.wait(timedelta(seconds=timeout_s))
        except RuntimeError as e:
            raise CollectiveError(
                f"rank {rank}: broadcast of bucket {launched.bucket.id} failed: {e}"
            ) from e
        launched.work = None
    if launched.error is not None:
        raise launched.error


def drain_moves(
    launched: list[Launched],
    rank: int,
    timeout_s: float,
    on_landed: Callable[[Launched], None] | None = None,
) -> bool:
    """Best effort after a failure: wait for every outstanding move until one deadline. False
    if a device copy or broadcast may still be writing (its buffer must then not be freed).
    ``on_landed`` runs for each move whose device work is done."""
    deadline = time.monotonic() + timeout_s
    for item in launched:
        if item.event is not None and not _wait_event(item.event, deadline):
            return False
        if on_landed is not None:
            on_landed(item)
        if item.work is not None:
            try:
                item.work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
            except RuntimeError as e:
                logger.warning("rank %d: outstanding broadcast failed: %s", rank, e)
    return True
