"""The P2P update driver: a subset of ranks pulls a checkpoint from its owners' host memory.

``ParameterServer.update(name, req_func, ranks=[...])``: the listed ranks of this job (e.g. the
parameter-server ranks of new inference instances) receive; the owners are the ranks described
by the loaded metas (``load_metas``: typically another, running job's file), reached through
the endpoints in those metas (ckpt_engine.p2p). Owners join no collective: they only serve.

It is the broadcast driver (ps/broadcast.py: phases, votes, worker link, IPC slots, wire) over
the receivers' own process groups, with three differences, made through its hooks:
- local check: the metas must carry an endpoint for every owner holding tensors (receivers
  hold nothing);
- plan: the broadcast plan of the owners' metas, reordered and each bucket given a reading
  receiver (p2p/assign.py: balanced bytes per owner and per receiver); ``Bucket.owner`` becomes
  that receiver's global rank, the broadcast's source;
- mover: the reading receiver's bytes come from a prefetch thread (p2p/prefetch.py: remote
  owner -> staging buffer), then the same path as the owner's copy in broadcast (H2D on a side
  stream or memcpy, then broadcast over the receivers into the slot).
A failed read still takes part in that bucket's broadcast (so the collectives stay matched),
is raised when the bucket is waited for, and the next vote ends the update on every receiver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ckpt_engine import env, host_memory
from ckpt_engine.errors import MetasError
from ckpt_engine.metas import CheckpointMetas
from ckpt_engine.p2p.assign import assign
from ckpt_engine.p2p.prefetch import Fetch, Prefetcher
from ckpt_engine.p2p.service import open_reader
from ckpt_engine.p2p.shards import Kept, kept_by_name, shard_copies
from ckpt_engine.planner import Bucket, BucketPlan
from ckpt_engine.progress import Progress
from ckpt_engine.ps.broadcast import BroadcastUpdate
from ckpt_engine.ps.context import UpdateContext, choose_plan
from ckpt_engine.ps.mover import Launched, await_landing, drain_moves, finish_move
from ckpt_engine.ps.outcome import Voted

logger = logging.getLogger(__name__)

STAGING_DEPTH = 2


def p2p_plan(plan: BucketPlan, ranks: Sequence[int]) -> tuple[BucketPlan, dict[int, Fetch]]:
    """Reorder ``plan`` and give each bucket a reader among ``ranks`` (global ranks); returns
    the receivers' plan (``owner`` = the reader) and, per bucket id, what to fetch from whom."""
    a = assign([b.owner for b in plan.buckets], [b.nbytes for b in plan.buckets], len(ranks))
    buckets, fetches = [], {}
    for new_id, (index, reader) in enumerate(zip(a.order, a.reader)):
        b = plan.buckets[index]
        fetches[new_id] = Fetch(new_id, b.owner, b.copies)
        buckets.append(replace(b, id=new_id, owner=ranks[reader]))
    return BucketPlan(slot_bytes=plan.slot_bytes, buckets=tuple(buckets)), fetches


def check_sources(metas: CheckpointMetas | None, name: str) -> None:
    if metas is None:
        raise MetasError(f"no metas for {name!r}: load the owners' metas (load_metas) first")
    missing = [r.rank for r in metas.ranks if r.tensors and not r.p2p]
    if missing:
        raise MetasError(
            f"metas of {name!r} carry no P2P endpoint for owner ranks {missing} (saved with "
            "p2p_serve off, or by a version without P2P)"
        )


@dataclass
class P2PLaunched(Launched):
    staging: int | None = None
    error: BaseException | None = None


class P2PMover:
    """SlotMover's interface (launch / wait / drain) for a receiver; ``start`` once the workers
    said which rows they keep, ``close`` at the end."""

    def __init__(
        self,
        *,
        ctx: UpdateContext,
        global_rank: int,
        buffer: torch.Tensor,
        plan: BucketPlan,
        fetches: dict[int, Fetch],
        open_reader: Callable[[int], object],
        take_timeout_s: float,
    ) -> None:
        self.rank = global_rank
        self.world_size = ctx.world_size
        self.group = ctx.data_group
        self.buffer = buffer
        self.plan, self.fetches, self.open_reader = plan, fetches, open_reader
        self.slot_bytes = plan.slot_bytes
        self.take_timeout_s = take_timeout_s
        cuda = ctx.device_type == "cuda"
        self.stream = (
            torch.cuda.Stream(device=torch.device("cuda", ctx.device_index)) if cuda else None
        )
        reads = sum(1 for b in plan.buckets if b.nbytes)
        self.staging: list[host_memory.HostBuffer] = []
        try:
            for _ in range(min(STAGING_DEPTH, reads)):
                self.staging.append(
                    host_memory.allocate(
                        plan.slot_bytes,
                        kind="anonymous",
                        shm_dir=env.shm_dir(),
                        label=f"{ctx.run_id}-r{ctx.rank}-p2p",
                        pin=cuda,
                    )
                )
        except BaseException:
            self._free()
            raise
        self.prefetch: Prefetcher | None = None
        self.sharded = False
        self.mine: dict[int, Fetch] = {}
        self._drained = True
        total = sum(b.nbytes for b in plan.buckets)  # every receiver lands every bucket
        self.progress = Progress(f"p2p pull {ctx.name!r}", total, rank=ctx.rank)

    def start(self, kept: dict[str, Kept] | None) -> None:
        """Start reading. ``kept`` (the rows this rank's worker keeps, by tensor name): every
        bucket, only those rows (`p2p.shards`), no broadcast; None: the buckets the plan gives
        this rank, whole, then broadcast over the receivers."""
        self.sharded = kept is not None
        buckets = [b for b in self.plan.buckets if b.nbytes]
        if self.sharded:
            mine = [Fetch(b.id, self.fetches[b.id].owner, shard_copies(b, kept)) for b in buckets]
        else:
            mine = [self.fetches[b.id] for b in buckets if b.owner == self.rank]
        self.mine = {f.bucket: f for f in mine}
        self.prefetch = Prefetcher(mine, self.staging, self.open_reader, rank=self.rank)

    @property
    def read_bytes(self) -> int:
        """Bytes this rank has read from the owners so far."""
        return self.prefetch.read_bytes if self.prefetch is not None else 0

    def launch(self, bucket: Bucket, slot: int) -> P2PLaunched:
        start = slot * self.slot_bytes
        view = self.buffer[start : start + bucket.nbytes]
        launched = P2PLaunched(bucket, slot)
        src = None
        if (self.sharded or bucket.owner == self.rank) and bucket.nbytes:
            try:
                launched.staging = self.prefetch.take(bucket.id, self.take_timeout_s)
                src = self.staging[launched.staging].tensor[: bucket.nbytes]
            except Exception as e:  # broadcast anyway: the others are in this collective
                launched.error = e
        # sharded: only the ranges read, a column shard's gaps included (one copy each; the
        # rest of the slot is never looked at)
        ranges = (
            [(c.dst, c.span) for c in self.mine[bucket.id].copies]
            if self.sharded and src is not None
            else [(0, bucket.nbytes)]
        )
        needs_broadcast = not self.sharded and self.world_size > 1 and bucket.nbytes > 0
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                if src is not None:
                    for a, n in ranges:
                        view[a : a + n].copy_(src[a : a + n], non_blocking=True)
                if needs_broadcast:
                    dist.broadcast(view, src=bucket.owner, group=self.group, async_op=True).wait()
                launched.event = torch.cuda.Event()
                launched.event.record(self.stream)
        else:
            if src is not None:
                for a, n in ranges:
                    view[a : a + n].copy_(src[a : a + n])
                self._release(launched)
            if needs_broadcast:
                launched.work = dist.broadcast(
                    view, src=bucket.owner, group=self.group, async_op=True
                )
        return launched

    def _release(self, launched: P2PLaunched) -> None:
        if launched.staging is not None:
            self.prefetch.release(launched.staging)
            launched.staging = None

    def wait(self, launched: P2PLaunched, timeout_s: float) -> None:
        await_landing(launched, self.rank, timeout_s)
        self._release(launched)
        finish_move(launched, self.rank, timeout_s)
        self.progress.advance(launched.bucket.nbytes)

    def drain(self, launched: list[P2PLaunched], timeout_s: float) -> bool:
        if drain_moves(launched, self.rank, timeout_s, on_landed=self._release):
            return True
        self._drained = False
        return False

    def close(self, timeout_s: float) -> None:
        """Stop the prefetch thread and free the staging buffers (kept if still in use)."""
        self.progress.close()
        stopped = self.prefetch is None or self.prefetch.stop(timeout_s)
        if stopped and self._drained:
            self._free()
        else:
            logger.error(
                "rank %d: a P2P read or copy never finished; keeping its buffers", self.rank
            )

    def _free(self) -> None:
        for buf in self.staging:
            buf.close()
        self.staging = []


class P2PUpdate(BroadcastUpdate):
    def __init__(
        self,
        ctx: UpdateContext,
        req_func: Callable[[list[tuple[str, str]]], object],
        *,
        global_ranks: Sequence[int],
        transport: str,
    ) -> None:
        super().__init__(ctx, req_func)
        self.global_ranks = list(global_ranks)
        self.transport = transport
        self.fetches: dict[int, Fetch] = {}

    def _check_local(self) -> None:
        check_sources(self.ctx.metas, self.ctx.name)

    def _launch_ahead(self, plan: BucketPlan) -> None:
        """Deferred to the end of the handshake: what to read depends on the workers' Acks."""

    def _handshake(self, plan: BucketPlan, socket_paths: list[tuple[str, str]]) -> None:
        """The broadcast handshake, then the mode, voted: sharded when every receiver's worker
        reported the rows it keeps (and ``p2p_shards``), else whole buckets and broadcast;
        then the first buckets start."""
        super()._handshake(plan, socket_paths)
        kept = None
        try:
            ack = self.plan_ack
            if self.ctx.config.p2p_shards and ack is not None and ack.keeps is not None:
                kept = kept_by_name(plan.manifest.names, ack.keeps)
        except Exception as e:
            self.outcome.fail(e)
        failed, whole = self.ctx.control.all_reduce(
            [int(self.outcome.error is not None), int(kept is None)],
            op="max",
            timeout_s=self.vote_timeout_s,
            what="vote (keeps)",
        )
        if failed:
            raise Voted
        self.timings["p2p_sharded"] = int(not whole)
        try:
            self.mover.start(None if whole else kept)
            BroadcastUpdate._launch_ahead(self, plan)
        except Exception as e:
            self.outcome.fail(e)

    def _make_plan(self, min_free: int) -> BucketPlan:
        plan, self.fetches = p2p_plan(
            choose_plan(self.ctx.metas, self.ctx.config, min_free), self.global_ranks
        )
        return plan

    def _open_reader(self, owner: int):
        metas = self.ctx.metas
        return open_reader(
            metas.ranks[owner].p2p,
            choice=self.transport,
            owner=f"owner rank {owner} (host {metas.ranks[owner].host})",
            checkpoint=metas.name,
            timeout_s=self.ctx.timeout_s,
        )

    def _make_mover(self, plan: BucketPlan) -> P2PMover:
        return P2PMover(
            ctx=self.ctx,
            global_rank=self.global_ranks[self.ctx.rank],
            buffer=self.ipc.tensor,
            plan=plan,
            fetches=self.fetches,
            open_reader=self._open_reader,
            take_timeout_s=self.vote_timeout_s,
        )

    def _cleanup(self, reason: str) -> None:
        try:
            super()._cleanup(reason)
        finally:
            if isinstance(self.mover, P2PMover):
                self.timings["p2p_read_bytes"] = self.mover.read_bytes
                logger.info(
                    "rank %d: P2P read %d bytes from the owners (%s)",
                    self.ctx.rank,
                    self.mover.read_bytes,
                    "only the rows its worker keeps" if self.mover.sharded else "whole buckets",
                )
                self.mover.close(self.vote_timeout_s)
