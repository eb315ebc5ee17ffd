"""Control collectives between parameter-server ranks, over a gloo group, with deadlines.

Metadata travels as JSON bytes in uint8 tensors (sizes exchanged first), never through
``all_gather_object`` (which pickles). Every wait has a timeout; a failed or timed-out
collective raises CollectiveError and marks the group broken (gloo cannot recover from it).
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ckpt_engine.errors import CollectiveError

logger = logging.getLogger(__name__)


class ControlGroup:
    def __init__(self, group: dist.ProcessGroup | None, *, rank: int, world_size: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.broken: str | None = None

    def _wait(self, work: dist.Work, timeout_s: float, what: str) -> None:
        try:
            work.wait(timedelta(seconds=timeout_s))
        except RuntimeError as e:
            timed_out = "timed out" in str(e).lower() or "timeout" in str(e).lower()
            self.broken = f"{what} failed: {e}"
            raise CollectiveError(
                f"rank {self.rank}: {what} failed "
                f"({'timed out after ' + str(timeout_s) + ' s' if timed_out else 'peer lost'}): {e}",
                timed_out=timed_out,
            ) from e

    def _check(self) -> None:
        if self.broken is not None:
            raise CollectiveError(
                f"rank {self.rank}: control group is broken by an earlier failure ({self.broken}); "
                "restart the parameter server"
            )

    def all_reduce(self, values: list[int], *, op: str, timeout_s: float, what: str) -> list[int]:
        """Element-wise MAX or MIN of int64 values over all ranks."""
        self._check()
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.int64)
        reduce_op = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        work = dist.all_reduce(tensor, op=reduce_op, group=self.group, async_op=True)
        self._wait(work, timeout_s, what)
        return tensor.tolist()

    def start_all_reduce(self, values: list[int], *, op: str, what: str) -> PendingReduce:
        """Start an element-wise MAX or MIN of int64 values over all ranks without waiting for
        it (a lagged vote); ``PendingReduce.result`` waits, with a deadline."""
        self._check()
        if self.world_size == 1:
            return PendingReduce(self, None, list(values), what)
        tensor = torch.tensor(values, dtype=torch.int64)
        reduce_op = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        work = dist.all_reduce(tensor, op=reduce_op, group=self.group, async_op=True)
        return PendingReduce(self, work, tensor, what)

    def all_gather_bytes(self, data: bytes, *, timeout_s: float, what: str) -> list[bytes]:
        self._check()
        if self.world_size == 1:
            return [data]
        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._wait(dist.all_gather(sizes, size, group=self.group, async_op=True), timeout_s, what)
        lengths = [int(s.item()) for s in sizes]
        longest = max(lengths)
        mine = torch.zeros(longest, dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        self._wait(
            dist.all_gather(gathered, mine, group=self.group, async_op=True), timeout_s, what
        )
        return [bytes(t[:n].numpy()) for t, n in zip(gathered, lengths)]

    def all_gather_json(self, obj: Any, *, timeout_s: float, what: str) -> list[Any]:
        """Every rank's JSON-serializable ``obj``, indexed by rank."""
        blobs = self.all_gather_bytes(
            json.dumps(obj, separators=(",", ":")).encode(), timeout_s=timeout_s, what=what
        )
        return [json.loads(b) for b in blobs]


class PendingReduce:
    """An all-reduce in flight on a ControlGroup (see ``ControlGroup.start_all_reduce``)."""

    def __init__(self, control: ControlGroup, work, value, what: str) -> None:
        self._control, self._work, self._value, self.what = control, work, value, what

    def result(self, timeout_s: float) -> list[int]:
        """The reduced values; CollectiveError if the collective fails or times out."""
        if self._work is not None:
            self._control._wait(self._work, timeout_s, self.what)
            self._work = None
            self._value = self._value.tolist()
        return self._value
