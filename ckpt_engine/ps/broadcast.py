"""The broadcast update driver: one update of one checkpoint on one rank.

Phases (every rank runs them in lockstep; each phase ends in a vote over the control group, so
a failure anywhere ends the update everywhere with the same error):

1. prepare: check local state against the metas, bind the worker socket, report free memory;
   gathered, so every rank learns every socket address and the plan's memory budget.
2. handshake: allocate the IPC buffer, start ``req_func(socket_paths)``, wait for the worker to
   connect, send Plan (buffer handle + manifest), wait for its Ack. Ranks vote every
   ``connect_poll_s`` while waiting, so a failure on one rank ends the wait on all.
3. buckets: for bucket k: vote; launch k into slot k % num_slots (H2D on the owner, broadcast);
   take the worker's Ack of bucket k-1; wait for k to land; send Bucket k. The worker consumes
   k-1 while k moves, and a slot is rewritten only after the Ack of the bucket that used it.
4. finish: Done (worker releases the buffer) -> free the buffer -> vote -> Commit (worker runs
   its post_hook) -> req_func returns -> final vote.

Each rank's stage, first failure and votes live in its ``Outcome`` (ps/outcome.py). On failure:
gather every rank's error record, send Abort to a worker still listening, free everything,
raise UpdateError (UpdateTimeout when the first failure was a timeout). The gather also
carries whether each rank sent its worker a Bucket, Done or Commit: when none did, no worker
wrote anything and the error says so (``UpdateError.untouched``; e.g. a manifest refused by a
worker, a P2P read refused before the first bucket), so a caller may resume serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from ckpt_engine import device, env, wire
from ckpt_engine.errors import CollectiveError, UpdateError, WorkerError
from ckpt_engine.ipc import IpcBuffer
from ckpt_engine.planner import BucketPlan
from ckpt_engine.ps.context import UpdateContext, check_local, choose_plan
from ckpt_engine.ps.link import ReqFuncThread, WorkerLink
from ckpt_engine.ps.mover import Launched, SlotMover
from ckpt_engine.ps.outcome import Outcome, Voted

logger = logging.getLogger(__name__)


class BroadcastUpdate:
    def __init__(self, ctx: UpdateContext, req_func: Callable[[list[tuple[str, str]]], object]):
        self.ctx = ctx
        self.req_func = req_func
        self.update_id = f"{ctx.run_id}-{ctx.update_no}"
        self.vote_timeout_s = 2 * ctx.timeout_s + 5
        # A context per update: terminating it at the end releases every socket and fd now,
        # not whenever zmq's reaper gets to it.
        self.zmq_ctx = zmq.Context()
        self.outcome = Outcome(
            name=ctx.name,
            rank=ctx.rank,
            control=ctx.control,
            update_id=self.update_id,
            vote_timeout_s=self.vote_timeout_s,
        )
        self.link: WorkerLink | None = None
        self.req: ReqFuncThread | None = None
        self.ipc: IpcBuffer | None = None
        self.mover: SlotMover | None = None
        self.in_flight: list[Launched] = []
        self.launched: dict[int, Launched] = {}  # launched, not yet handed to the worker
        self.depth = 1  # buckets launched ahead of the worker (set in the handshake)
        self.plan_ack: wire.Ack | None = None  # the worker's Ack of the plan (its keeps)
        self.timings: dict[str, float | int] = {}  # seconds per phase, for benchmarks and logs

    # -- phases --------------------------------------------------------------------------------
    # Hooks a variant driver overrides (ps/p2p.py: a subset of ranks reading from remote owners).
    def _check_local(self) -> None:
        check_local(self.ctx)

    def _make_plan(self, min_free: int) -> BucketPlan:
        return choose_plan(self.ctx.metas, self.ctx.config, min_free, self.ctx.plan_cache)

    def _make_mover(self, plan: BucketPlan) -> SlotMover:
        ctx = self.ctx
        return SlotMover(
            device_type=ctx.device_type,
            device_index=ctx.device_index,
            rank=ctx.rank,
            world_size=ctx.world_size,
            group=ctx.data_group,
            buffer=self.ipc.tensor,
            slot_bytes=plan.slot_bytes,
            checkpoint=ctx.checkpoint,
        )

    def _make_link(self) -> WorkerLink:
        """The bound socket to this rank's worker (compat/ps_driver.py: the upstream wire)."""
        ctx = self.ctx
        return WorkerLink(
            self.zmq_ctx,
            ctx.socket_dir.address(f"r{ctx.rank}u{ctx.update_no}"),
            update_id=self.update_id,
            max_bytes=ctx.config.max_message_bytes,
        )

    def _prepare(self) -> list[dict]:
        ctx = self.ctx
        info: dict = {"device_key": ctx.device_key, "address": "", "free": 0, "error": None}
        try:
            self._check_local()
            self.link = self._make_link()
            info["address"] = self.link.address
            info["free"] = device.free_bytes(ctx.device_type, ctx.device_index)
        except Exception as e:
            self.outcome.fail(e)
            info["error"] = self.outcome.error
        return ctx.control.all_gather_json(info, timeout_s=self.vote_timeout_s, what="prepare")

    def _handshake(self, plan: BucketPlan, socket_paths: list[tuple[str, str]]) -> None:
        ctx, link = self.ctx, self.link
        try:
            self.ipc = IpcBuffer(
                ctx.device_type,
                ctx.device_index,
                plan.slot_bytes * ctx.config.num_slots,
                shm_dir=env.shm_dir(),
                label=f"{ctx.run_id}-r{ctx.rank}",
            )
            self.mover = self._make_mover(plan)
        except Exception as e:
            self.outcome.fail(e)
        self.outcome.vote()  # every rank holds its buffer: the first buckets may start moving
        try:
            self.req = link.req = ReqFuncThread(self.zmq_ctx, self.req_func, socket_paths)
            self.req.start()
            self.depth = min(ctx.config.num_slots, getattr(self.mover, "max_in_flight", 1))
            self._launch_ahead(plan)  # while the worker connects
        except Exception as e:
            self.outcome.fail(e)
        self.outcome.bucket = None
        deadline = time.monotonic() + ctx.timeout_s
        state = "connect"
        while True:
            if self.outcome.error is None and state != "ready":
                try:
                    state = self._advance(state, plan, deadline)
                except Exception as e:
                    self.outcome.fail(e)
            if not self.outcome.vote(pending=state != "ready"):
                return

    def _launch_ahead(self, plan: BucketPlan) -> None:
        """Launch the first ``depth`` buckets (the P2P driver defers this until the worker has
        said which rows it keeps)."""
        for j in range(min(self.depth, len(plan.buckets))):
            self._launch(plan, j)

    def _advance(self, state: str, plan: BucketPlan, deadline: float) -> str:
        round_end = min(deadline, time.monotonic() + self.ctx.config.connect_poll_s)
        link = self.link
        if state == "connect" and link.wait_connected(round_end):
            link.send(self._plan_message(plan), what="plan")
            state = "plan"
        if state == "plan" and (ack := link.reply(round_end, of="plan")) is not None:
            self.plan_ack = ack
            state = "ready"
        if state != "ready" and time.monotonic() >= deadline:
            what = "connect" if state == "connect" else "acknowledge the plan"
            raise WorkerError(
                f"worker did not {what} within {self.ctx.timeout_s} s", timed_out=True
            )
        return state

    def _plan_message(self, plan: BucketPlan) -> wire.Plan:
        ctx = self.ctx
        return wire.Plan(
            update_id=self.update_id,
            rank=ctx.rank,
            device_key=ctx.device_key,
            buffer=self.ipc.handle,
            num_slots=ctx.config.num_slots,
            slot_bytes=plan.slot_bytes,
            num_buckets=len(plan.buckets),
            recv_timeout_s=self.vote_timeout_s + ctx.timeout_s,
            manifest=plan.manifest,
            layout=plan.layout,
        )

    def _launch(self, plan: BucketPlan, j: int) -> None:
        self.outcome.bucket = j
        launched = self.mover.launch(plan.buckets[j], j % self.ctx.config.num_slots)
        self.in_flight.append(launched)
        self.launched[j] = launched

    def _buckets(self, plan: BucketPlan) -> None:
        """Bucket k: take the worker's Ack of k-1 (its slot is free again), launch k-1+depth
        into that slot, wait for k to land, send Bucket k. Up to ``depth`` buckets move ahead
        of the worker, so neither its Acks nor this loop's waits reach the copy engine.

        Votes are lagged instead of per-bucket barriers: after bucket k every rank starts an
        all-reduce of its error flag; round k begins by waiting for the vote of round k-2 (long
        done; k-1 when only one bucket is in flight). If any rank failed, every rank stops at
        the same bucket, so the broadcasts stay matched, and before reading the worker's reply
        to a bucket whose launch failed somewhere (the vote covers every launch up to k-1). A
        rank that failed itself keeps launching (it is in those broadcasts) but no longer talks
        to its worker, until the votes stop it."""
        ctx, n = self.ctx, len(plan.buckets)
        self.outcome.stage = "bucket"
        votes: list = []
        sent = -1
        lag = min(2, self.depth)
        for k in range(n):
            if k >= 1:
                if k >= lag and votes[k - lag].result(self.vote_timeout_s)[0]:
                    break  # some rank failed: every rank stops at this same bucket
                if self.outcome.error is None:
                    try:
                        self._reply(k - 1)
                    except Exception as e:
                        self.outcome.fail(e)
                j = k - 1 + self.depth
                if self.depth <= j < n:
                    try:
                        self._launch(plan, j)
                    except Exception as e:
                        self.outcome.fail(e)
            if self.outcome.error is None:
                try:
                    self.outcome.bucket = k
                    launched = self.launched.pop(k)
                    self.mover.wait(launched, self.vote_timeout_s)
                    self.in_flight.remove(launched)
                    self.outcome.delivered = True
                    self.link.send(self._bucket_message(launched), what=f"bucket {k}")
                    sent = k
                except Exception as e:
                    self.outcome.fail(e)
            votes.append(
                ctx.control.start_all_reduce(
                    [int(self.outcome.error is not None)], op="max", what=f"vote (bucket {k})"
                )
            )
        if self.outcome.error is None and sent == n - 1 and n > 0:
            try:
                self._reply(n - 1)
            except Exception as e:
                self.outcome.fail(e)
        for vote in votes:
            vote.result(self.vote_timeout_s)
        self.outcome.bucket = None
        self.outcome.vote()

    def _reply(self, k: int) -> None:
        self.outcome.bucket = k
        deadline = time.monotonic() + self.ctx.timeout_s
        if self.link.reply(deadline, of="bucket", bucket=k) is None:
            raise WorkerError(
                f"no reply from the worker to bucket {k} within {self.ctx.timeout_s} s",
                bucket=k,
                timed_out=True,
            )

    def _bucket_message(self, launched: Launched) -> wire.Bucket:
        return wire.Bucket(update_id=self.update_id, id=launched.bucket.id, slot=launched.slot)

    def _finish(self) -> None:
        ctx, link = self.ctx, self.link
        self.outcome.stage = "done"
        self.outcome.delivered = (
            True  # Done, then Commit (the upstream wire's post_hook may run at either)
        )
        try:
            link.request(
                wire.Done(update_id=self.update_id), time.monotonic() + ctx.timeout_s, of="done"
            )
            self._free_buffer()  # the worker has let go; free device memory before its post_hook
        except Exception as e:
            self.outcome.fail(e)
        self.outcome.vote()
        self.outcome.stage = "commit"
        try:
            deadline = time.monotonic() + ctx.timeout_s
            link.request(wire.Commit(update_id=self.update_id), deadline, of="commit")
            self.outcome.stage = "req_func"
            if not self.req.join(deadline):
                raise WorkerError(
                    f"req_func did not return within {ctx.timeout_s} s", timed_out=True
                )
            self.req.check()
        except Exception as e:
            self.outcome.fail(e)
        self.outcome.vote()

    def _free_buffer(self, collect: bool = False) -> None:
        """Free the IPC buffer now: drop the mover's reference first, so that the memory goes
        back to the device, not into torch's cache. ``collect`` (failure paths only: a full
        garbage collection costs tens of ms in a process that imported torch) also breaks
        reference cycles, e.g. through a traceback, that may still hold it."""
        if self.mover is not None:
            self.mover.buffer = None
        self.in_flight.clear()
        self.launched.clear()
        if self.ipc is not None:
            self.ipc.close(collect=collect)
            self.ipc = None

    # -- driver --------------------------------------------------------------------------------
    def run(self) -> None:
        failure: UpdateError | None = None
        try:
            try:
                self._phases()
            except Voted:
                failure = self.outcome.gathered()
            except CollectiveError as e:
                failure = self.outcome.lost_contact(e)
            except UpdateError as e:
                failure = e
        finally:
            self._cleanup(str(failure) if failure is not None else "update interrupted")
        if failure is not None:
            raise failure

    def _phases(self) -> None:
        ctx = self.ctx
        self._t0 = self._t_last = time.perf_counter()
        infos = self._prepare()
        failures = [i["error"] for i in infos if i["error"]]
        if failures:  # no worker has been contacted yet
            raise self.outcome.refused(failures)
        try:
            plan = self._make_plan(min(i["free"] for i in infos))
        except ValueError as e:  # same inputs on every rank: every rank raises this
            self.outcome.fail(e)
            raise self.outcome.refused([self.outcome.error]) from e
        socket_paths = [(i["device_key"], i["address"]) for i in infos]
        self.timings.update(buckets_n=len(plan.buckets), slot_bytes=plan.slot_bytes)
        self._mark("prepare")
        self.outcome.stage = "handshake"
        self._handshake(plan, socket_paths)
        self._mark("handshake")
        self._buckets(plan)
        self._mark("buckets")
        self._finish()
        self._mark("finish")
        logger.info(
            "rank %d: update %s done: %d buckets in %.3f s (%s)",
            ctx.rank,
            self.update_id,
            len(plan.buckets),
            time.perf_counter() - self._t0,
            ", ".join(f"{k} {v:.3f}" for k, v in self.timings.items() if isinstance(v, float)),
        )

    def _mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase] = now - self._t_last
        self._t_last = now

    def _cleanup(self, reason: str) -> None:
        ctx = self.ctx
        if self.mover is not None and not self.mover.drain(self.in_flight, self.vote_timeout_s):
            logger.error("rank %d: a broadcast never finished; keeping its buffer", ctx.rank)
            self.ipc = None  # leak rather than free memory a collective may still write
        if self.link is not None:
            if not self.link.finished:
                self.link.abort(reason, min(ctx.timeout_s, 10.0))
            self.link.close()
        if self.ipc is not None:
            self._free_buffer(collect=True)
        if self.req is not None:
            if not self.req.join(time.monotonic() + min(ctx.timeout_s, 5.0)):
                logger.warning("rank %d: req_func still running after the update ended", ctx.rank)
            self.req.close()
        self.zmq_ctx.term()
