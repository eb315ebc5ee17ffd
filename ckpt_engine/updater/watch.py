"""``--watch DIR``: an updater that stays up and pushes each new complete checkpoint under DIR.

The rule a trainer follows (docs/update.md#watch-mode):
- a checkpoint is a subdirectory ``DIR/<name>/`` holding its safetensors files (and
  ``model.safetensors.index.json`` when sharded; other files are ignored); names starting with
  ``.`` are never looked at (write into ``DIR/.tmp-<name>/`` and rename it, if you like);
- it is **complete** once the marker ``DIR/<name>/COMPLETE`` exists; write it last, after
  every file is closed. Nothing of a checkpoint without its marker is read;
- names sort in natural order (``step-9`` before ``step-10``); each round, the newest
  complete checkpoint after the last one pushed is pushed, and the complete ones before it that
  were not pushed yet are skipped as superseded (logged); a checkpoint that appears with a name
  before the last one pushed is ignored (logged once);
- a checkpoint that cannot be pushed (a truncated or corrupt file: the error names the file;
  a server's refusal) is refused once, on every rank (logged and written to --json-out), and
  never tried again; the server keeps the weights of the last complete update (see
  docs/failure_policy.md) and the watcher waits for the next.

Every rank must push the same checkpoint, so only rank 0 lists DIR: each round (every
``--watch-interval`` seconds) the ranks all-gather one small record over the control group
(gloo), rank 0's decision (push NAME, wait, stop) and each rank's stop request, and every rank
acts on rank 0's decision (a DIR rank 0 cannot list, e.g. a file, fails every rank alike,
naming DIR; a DIR that does not exist yet is waited for). SIGTERM / SIGINT on any rank is a
stop request: the push in flight finishes, then every rank returns 128 + the signal (143 /
130), leaving the server on the last pushed weights. A second signal stops at once (as without --watch); a rank still alive 25 s
after the first (torchrun kills after 30 s) removes its files and exits.
"""

from __future__ import annotations

import logging
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_engine.errors import CheckpointFileError
from ckpt_engine.ps.collectives import ControlGroup

logger = logging.getLogger("ckpt_engine.examples.update")

MARKER = "COMPLETE"
STOP_GRACE_S = 25.0  # torchrun sends SIGKILL 30 s after its SIGTERM
SLICE_S = 0.05  # a stop request ends a wait within this


def natural_key(name: str) -> tuple:
    """``step-9`` < ``step-10``: digit runs compare as numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name))


@dataclass(frozen=True)
class Listing:
    """What rank 0 saw in DIR after the last checkpoint pushed, in natural order."""

    complete: tuple[str, ...]
    incomplete: tuple[str, ...]
    older: tuple[str, ...]  # sort before the last pushed one: never pushed


def list_checkpoints(directory: Path, *, after: str | None, refused: set[str]) -> Listing:
    complete, incomplete, older = [], [], []
    try:
        entries = sorted(
            (e for e in directory.iterdir() if not e.name.startswith(".") and e.is_dir()),
            key=lambda e: natural_key(e.name),
        )
    except FileNotFoundError:
        entries = []
    last = natural_key(after) if after is not None else None
    for entry in entries:
        if entry.name in refused or entry.name == after:
            continue
        if last is not None and natural_key(entry.name) <= last:
            older.append(entry.name)
        elif (entry / MARKER).is_file():
            complete.append(entry.name)
        else:
            incomplete.append(entry.name)
    return Listing(tuple(complete), tuple(incomplete), tuple(older))


@dataclass
class StopRequest:
    """Set from the signal handler (leases.StopSignals.soften); read by the watch loop."""

    signum: int | None = None

    def __call__(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            logger.info("%s received: stopping after the push in flight", _signame(signum))

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` (the poll interval), ending early on a stop request."""
        end = time.monotonic() + seconds
        while self.signum is None and (left := end - time.monotonic()) > 0:
            time.sleep(min(SLICE_S, left))


def _signame(signum: int) -> str:
    return signal.Signals(signum).name


@dataclass
class Pushed:
    """One checkpoint handed to the push function."""

    name: str
    skipped: tuple[str, ...]
    number: int  # 1 for the first push of this watcher
    complete_at: float | None = None  # the marker's mtime (unix s, rank 0's clock)


@dataclass
class Watcher:
    """The loop; ``push(path, pushed)`` moves one checkpoint (collective, raising on every rank
    alike when it is refused); ``fatal(error)`` says when a refusal leaves the ranks unable to
    go on (a broken control group), which ends the loop with that error."""

    directory: Path
    control: ControlGroup
    interval_s: float = 1.0
    max_updates: int | None = None
    idle_timeout_s: float | None = None
    timeout_s: float = 1800.0
    stop: StopRequest = field(default_factory=StopRequest)
    # rank 0's state (the others follow its decisions)
    last: str | None = None
    refused: set[str] = field(default_factory=set)
    pushes: int = 0
    _told: set[str] = field(default_factory=set)

    def run(
        self,
        push: Callable[[Path, Pushed], Any],
        fatal: Callable[[BaseException], bool] = lambda e: False,
    ) -> int:
        """Until a stop: 0 (--watch-max-updates, --watch-idle-timeout) or 128 + signal."""
        rank = self.control.rank
        if rank == 0:
            logger.info(
                "watching %s every %.2f s for complete checkpoints (<name>/%s)",
                self.directory,
                self.interval_s,
                MARKER,
            )
        idle_since = time.monotonic()
        while True:
            decision = self._decide(idle_since) if rank == 0 else None
            votes = self.control.all_gather_json(
                {"stop": self.stop.signum, "decision": decision},
                timeout_s=self.timeout_s,
                what="watch round",
            )
            stops = [v["stop"] for v in votes if v["stop"] is not None]
            if stops:
                signum = self.stop.signum or stops[0]
                if rank == 0:
                    logger.info(
                        "watch: stopped by %s after %d push(es)", _signame(signum), self.pushes
                    )
                return 128 + signum
            decision = votes[0]["decision"]
            if decision["action"] == "fail":  # on every rank alike
                raise CheckpointFileError(decision["path"], decision["why"])
            if decision["action"] == "stop":
                if rank == 0:
                    logger.info("watch: %s; %d push(es)", decision["why"], self.pushes)
                return 0
            if decision["action"] == "wait":
                self.stop.wait(self.interval_s)
                continue
            name = decision["name"]
            pushed = Pushed(
                name, tuple(decision["skipped"]), self.pushes + 1, decision.get("complete_at")
            )
            try:
                push(self.directory / name, pushed)
            except Exception as e:
                if fatal(e):
                    raise
                self.refused.add(name)
                if rank == 0:
                    logger.error(
                        "watch: refused %s: %s; still serving %s",
                        name,
                        e,
                        self.last or "what the server had",
                    )
            else:
                self.last, self.pushes = name, self.pushes + 1
                self._told.add(name)  # no "ignoring" about it once the next one is pushed
            idle_since = time.monotonic()

    def _decide(self, idle_since: float) -> dict:
        if self.max_updates is not None and self.pushes >= self.max_updates:
            return {"action": "stop", "why": f"--watch-max-updates {self.max_updates} reached"}
        try:
            seen = list_checkpoints(self.directory, after=self.last, refused=self.refused)
        except OSError as e:  # decided, so that every rank leaves the loop, not rank 0 alone
            why = f"cannot list the --watch directory (rank 0): {e}"
            return {"action": "fail", "path": str(self.directory), "why": why}
        for name in seen.incomplete + seen.older:
            if name not in self._told:
                self._told.add(name)
                if name in seen.older:
                    logger.warning(
                        "watch: ignoring %s: it sorts before %s, already pushed", name, self.last
                    )
                else:
                    logger.info("watch: %s is not complete yet (no %s): waiting", name, MARKER)
        if seen.complete:
            newest, skipped = seen.complete[-1], list(seen.complete[:-1])
            skipped += [n for n in seen.incomplete if natural_key(n) < natural_key(newest)]
            skipped.sort(key=natural_key)
            if skipped:
                logger.info(
                    "watch: skipping %s: superseded by %s before being pushed",
                    ", ".join(skipped),
                    newest,
                )
            self.refused.update(skipped)  # never pushed later (they sort before `newest`)
            try:
                complete_at = (self.directory / newest / MARKER).stat().st_mtime
            except OSError:
                complete_at = None
            return {
                "action": "push",
                "name": newest,
                "skipped": skipped,
                "complete_at": complete_at,
            }
        if self.idle_timeout_s is not None and time.monotonic() - idle_since >= self.idle_timeout_s:
            return {"action": "stop", "why": f"no new checkpoint for {self.idle_timeout_s} s"}
        return {"action": "wait"}


# ---- the updater's watch mode (ckpt_engine.update --watch) ------------------------------------


def run_watch(args: Any, stop_signals: Any = None) -> int:
    """``ckpt-engine-update --watch DIR``: set up once (ranks, process group, server, host
    pool), then push each checkpoint the Watcher picks; returns the exit code."""
    from ckpt_engine import ParameterServer, PSConfig
    from ckpt_engine import env as ce_env
    from ckpt_engine import update as upd
    from ckpt_engine.device import resolve_device_type
    from ckpt_engine.updater.client import InferenceClient

    denv = ce_env.dist_env()
    endpoint = upd.pick_endpoint(args.endpoints, denv, args.inference_parallel_size)
    # files are always copied into the pool, never mapped in place: the trainer may delete or
    # rewrite a checkpoint's files once it is pushed; no P2P serving (its flags are refused)
    config = PSConfig(pin_in_place=False, p2p_serve=False)
    ps = ParameterServer(device_type=resolve_device_type(args.device), config=config)
    stop = StopRequest()
    if stop_signals is not None:
        stop_signals.soften(stop, grace_s=STOP_GRACE_S)
    try:
        control = upd.init_distributed(ps)
        client = InferenceClient(endpoint, uds=args.uds, api_key=args.api_key)
        job = upd.Job(args=args, ps=ps, control=control, client=client)
        if job.is_instance_head:
            logger.info("rank %d: waiting for %s", ps.rank, endpoint)
        job.step("ready", lambda: job.is_instance_head and client.wait_ready(args.ready_timeout))
        watcher = Watcher(
            Path(args.watch),
            control,
            interval_s=args.watch_interval,
            max_updates=args.watch_max_updates,
            idle_timeout_s=args.watch_idle_timeout,
            timeout_s=max(ps.config.init_timeout_s, args.timeout),
            stop=stop,
        )

        def push(path: Path, pushed: Pushed) -> None:
            push_checkpoint(job, args, path, pushed, endpoint=endpoint)

        def fatal(error: BaseException) -> bool:
            broken = control.broken or ps.broken
            if broken is not None:
                logger.error("watch: cannot go on: %s", broken)
            return broken is not None

        return watcher.run(push, fatal)
    finally:
        ps.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def push_checkpoint(job: Any, args: Any, path: Path, pushed: Pushed, *, endpoint: str) -> None:
    """One push of the watch loop: prepare (split: every file's header checked), drop the
    previous checkpoint (its buffers back to the pool), register + gather + update as in a
    single update (--register-mode), then free the pool's unused buffers. Raises on every rank
    alike when refused; one --json-out line per rank either way."""
    from ckpt_engine import update as upd
    from ckpt_engine.updater.report import json_line, result_of
    from ckpt_engine.updater.split import register_share, split_checkpoint

    ps, name = job.ps, pushed.name
    job.args = args.for_checkpoint(str(path), name)
    job.timings, job.own_timings = {}, {}
    ps.last_update_timings = {}  # a refused push reports no phases of the previous one
    start = time.perf_counter()
    splits: list = []
    result, own, error = None, None, None
    try:
        job.step("prepare", lambda: splits.append(split_checkpoint(path, ps.world_size)))
        mode, share = splits[0][0], splits[0][1][ps.rank]
        for old in ps.registered_checkpoints():  # the previous one (only ever one)
            ps.unregister_checkpoint(old)  # its buffers go back to the pool for this one
        if args.register_mode == "overlap":
            job.timings["register"] = job.timings["gather"] = 0.0
            upd.update_steps(job, share)
        else:
            job.step("register", lambda: register_share(ps, name, share))
            job.step("gather", lambda: ps.gather_metas(name))
            upd.update_steps(job, None)
        metas = ps.get_metas(name)
        result = result_of(job, metas, mode)
        own = sum(metas.ranks[ps.rank].buffer_bytes)
    except Exception as e:
        error = e
        if name in ps.registered_checkpoints():
            ps.unregister_checkpoint(name)
    freed = ps.host_pool.trim()  # the pool keeps what is registered, nothing more
    seconds = time.perf_counter() - start
    # from the trainer's marker to the servers applying it (poll wait included); the marker's
    # mtime is the filesystem's clock: on a shared filesystem, clock skew shows here
    since = None if pushed.complete_at is None else time.time() - pushed.complete_at
    pool = ps.host_pool
    extra = {
        "push_seconds": seconds,
        "since_complete_seconds": since,
        "watch": {
            "directory": str(path.parent),
            "push": pushed.number,
            "skipped": list(pushed.skipped),
        },
        "pool": {
            "held_bytes": pool.held_bytes,
            "allocated_bytes": pool.allocated_bytes,
            "buffers_allocated": pool.allocated,
            "buffers_reused": pool.reused,
            "freed_bytes": freed,
        },
    }
    json_line(job, endpoint, result=result, rank_bytes=own, error=error, extra=extra)
    if error is not None:
        raise error
    if ps.rank == 0:
        logger.info(
            "watch: pushed %s in %.3f s, %s s after its marker (%d bytes, %d tensors; prepare "
            "%.3f s, register %.3f s, gather %.3f s, update %.3f s, %.2f GB/s); pool holds %d "
            "bytes (%d allocated so far)",
            name,
            seconds,
            "?" if since is None else f"{since:.3f}",
            result["bytes"],
            result["tensors"],
            job.timings["prepare"],
            result["register_s"],
            result["gather_s"],
            result["update_s"],
            result["update_gb_s"],
            pool.held_bytes,
            pool.allocated_bytes,
        )
