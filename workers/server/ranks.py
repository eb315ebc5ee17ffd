"""`RankGroup`: the front's handle on the rank processes (spawn, call, liveness, shutdown).

One pipe per rank carries `messages` records. `call` sends one `Call` to every rank and gathers
every answer before its deadline, waking on data or on a rank's death (process sentinels), so a
dead rank is reported at once, naming it. Answers to an earlier, timed-out call are recognised by
their sequence number and dropped. Not thread-safe: the front serialises calls (FIFO lock).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from workers.config import ServerArgs
from workers.distributed import host_store
from workers.errors import RankDeadError, RankError, RankTimeoutError, StartupError
from workers.server.messages import (
    MAX_FRAME_BYTES,
    Call,
    Failure,
    Message,
    Ready,
    Reply,
    Shutdown,
    StartupFailed,
    decode,
    encode,
)
from workers.server.rank import rank_main

logger = logging.getLogger(__name__)


class RankGroup:
    def __init__(self, procs: list, conns: list[Connection], store) -> None:
        self.procs = procs
        self.conns = conns
        self._store = store  # the TP rendezvous store lives as long as the group
        self._seq = 0
        self.ready: list[Ready] = []

    @classmethod
    def launch(cls, args: ServerArgs) -> RankGroup:
        """Start one process per rank and wait until all have loaded their weights. On any
        failure, stop them all and raise `StartupError` with each failed rank's cause."""
        ctx = mp.get_context("spawn")
        store = host_store(args.startup_timeout)
        procs, conns = [], []
        for rank in range(args.tp):
            ours, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=rank_main,
                args=(rank, args.to_dict(), store.port, os.getpid(), theirs),
                name=f"ckpt-engine-rank{rank}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(ours)
        group = cls(procs, conns, store)
        try:
            group._await_ready(time.monotonic() + args.startup_timeout)
        except BaseException:
            group.shutdown(timeout=5.0)
            raise
        return group

    def _await_ready(self, deadline: float) -> None:
        try:
            answers = self._gather(range(len(self.procs)), deadline, accept=(Ready, StartupFailed))
        except RankError as e:
            raise StartupError(f"rank processes did not start: {e}") from e
        failed = [a for a in answers.values() if isinstance(a, StartupFailed)]
        if failed:
            raise StartupError(
                "; ".join(f"rank {a.rank} failed to start: {a.error}" for a in failed)
            )
        self.ready = [answers[r] for r in sorted(answers)]

    def call(self, method: str, args: list, kwargs: dict, *, timeout: float) -> list[Any]:
        """Run `method` on every rank; the values in rank order, or `RankError` naming ranks."""
        self._seq += 1
        msg = Call(seq=self._seq, method=method, args=list(args), kwargs=dict(kwargs))
        for rank in range(len(self.procs)):
            self._send(rank, msg)
        answers = self._gather(
            range(len(self.procs)), time.monotonic() + timeout, accept=(Reply, Failure)
        )
        failures = [a for a in answers.values() if isinstance(a, Failure)]
        if failures:
            by_error: dict[str, list[int]] = {}
            for f in sorted(failures, key=lambda f: f.rank):
                by_error.setdefault(f.error, []).append(f.rank)
            raise RankError(
                "; ".join(f"{_ranks(rs)}: {error}" for error, rs in by_error.items()),
                ranks=[f.rank for f in failures],
                weights_modified=any(f.weights_modified for f in failures),
            )
        return [answers[r].value for r in sorted(answers)]

    def _send(self, rank: int, msg: Message) -> None:
        try:
            self.conns[rank].send_bytes(encode(msg))
        except OSError as e:
            raise RankDeadError(f"rank {rank} is gone: {e}", ranks=[rank]) from e

    def _gather(self, ranks, deadline: float, *, accept: tuple[type, ...]) -> dict[int, Any]:
        pending = set(ranks)
        answers: dict[int, Any] = {}
        while pending:
            for rank in sorted(pending):
                msg = self._poll(rank)
                if msg is None:
                    continue
                if isinstance(msg, Reply | Failure) and msg.seq != self._seq:
                    continue  # the late answer to an earlier, timed-out call
                if not isinstance(msg, accept):
                    raise RankError(
                        f"rank {rank} sent an unexpected {type(msg).__name__}", ranks=[rank]
                    )
                answers[rank] = msg
                pending.discard(rank)
                if isinstance(msg, StartupFailed):
                    return answers  # the others may be blocked on the failed one
            if not pending:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RankTimeoutError(
                    f"rank(s) {sorted(pending)} did not answer within the deadline",
                    ranks=sorted(pending),
                )
            watched = [self.conns[r] for r in pending] + [self.procs[r].sentinel for r in pending]
            wait(watched, timeout=remaining)
        return answers

    def _poll(self, rank: int) -> Message | None:
        """The rank's next message if one is waiting; `RankDeadError` if the rank is gone."""
        conn = self.conns[rank]
        try:
            if conn.poll():
                return decode(conn.recv_bytes(MAX_FRAME_BYTES))
        except (EOFError, OSError) as e:
            raise self._dead(rank) from e
        if not self.procs[rank].is_alive():
            raise self._dead(rank)
        return None

    def _dead(self, rank: int) -> RankDeadError:
        code = self.procs[rank].exitcode
        return RankDeadError(f"rank {rank} process exited (exit code {code})", ranks=[rank])

    def dead_ranks(self) -> list[int]:
        """Ranks whose process has exited (safe to call while another thread runs `call`)."""
        gone = set(wait([p.sentinel for p in self.procs], timeout=0))
        return [r for r, p in enumerate(self.procs) if p.sentinel in gone]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask every rank to stop, then terminate and kill whatever is left."""
        for rank, proc in enumerate(self.procs):
            if proc.is_alive():
                with contextlib.suppress(OSError):
                    self.conns[rank].send_bytes(encode(Shutdown()))
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                logger.warning("terminating %s", proc.name)
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        for conn in self.conns:
            conn.close()


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
