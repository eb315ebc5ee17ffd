"""ProcessGroups: torch.distributed as one parameter-server rank uses it.

Initialized at the first collective unless the caller already did (gloo on CPU,
``cpu:gloo,cuda:nccl`` on GPU; the rendezvous at MASTER_ADDR:MASTER_PORT from torchrun, or a
free loopback port for a job of one rank), then:

- ``control()``: a gloo group with deadlines (``ControlGroup``) for votes and metadata;
- ``data``: the group buckets are broadcast over (WORLD, or an NCCL group when WORLD is not);
- ``subgroups(ranks)``: a subset's own control and data groups (P2P receivers). Creating a
  group is collective over the whole job, so every rank calls it with the same ranks; each
  subset's groups are made once and kept.

``close`` destroys torch.distributed only if it was initialized here.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import timedelta

import torch.distributed as dist

from ckpt_engine.env import DistEnv
from ckpt_engine.ps.collectives import ControlGroup


def check_ranks(ranks: Sequence[int], world_size: int) -> list[int]:
    """``ranks`` as a sorted list of distinct ranks of a job of ``world_size``; ValueError
    naming the problem."""
    ranks = list(ranks)
    if not ranks or not all(
        isinstance(r, int) and not isinstance(r, bool) and 0 <= r < world_size for r in ranks
    ):
        raise ValueError(f"ranks must be ranks of this job (0..{world_size - 1}): {ranks}")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks lists a rank twice: {ranks}")
    return sorted(ranks)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessGroups:
    def __init__(self, denv: DistEnv, *, device_type: str, timeout_s: float) -> None:
        self.env = denv
        self.device_type = device_type
        self.timeout = timedelta(seconds=timeout_s)
        self._control: ControlGroup | None = None
        self.data: dist.ProcessGroup | None = None  # set by the first control()
        self._owns_process_group = False
        self._subsets: dict[tuple[int, ...], tuple[ControlGroup, object]] = {}

    @property
    def broken(self) -> str | None:
        """Why the control group cannot run another collective (a failed or timed-out one)."""
        return None if self._control is None else self._control.broken

    def control(self) -> ControlGroup:
        """The job's control group; the first call initializes torch.distributed if needed
        and makes the control and data groups (collective)."""
        if self._control is not None:
            return self._control
        rank, world_size = self.env.rank, self.env.world_size
        if not dist.is_initialized():
            port = self.env.master_port
            if port is None:
                if world_size > 1:
                    raise ValueError(
                        "MASTER_PORT is not set (run under torchrun or pass master_port)"
                    )
                port = _free_port()
            dist.init_process_group(
                backend="cpu:gloo,cuda:nccl" if self.device_type == "cuda" else "gloo",
                init_method=f"tcp://{self.env.master_addr}:{port}",
                rank=rank,
                world_size=world_size,
                timeout=self.timeout,
            )
            self._owns_process_group = True
        elif (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise ValueError(
                f"torch.distributed is initialized as rank {dist.get_rank()}/"
                f"{dist.get_world_size()}, not {rank}/{world_size}"
            )
        group = dist.new_group(backend="gloo", timeout=self.timeout)
        self.data = dist.group.WORLD
        if self.device_type == "cuda" and "nccl" not in str(dist.get_backend()):
            self.data = dist.new_group(backend="nccl", timeout=self.timeout)
        self._control = ControlGroup(group, rank=rank, world_size=world_size)
        return self._control

    def subgroups(self, ranks: list[int]) -> tuple[ControlGroup, object]:
        """Control (gloo) and data groups of ``ranks`` (``check_ranks``'d); collective over the
        whole job. A rank outside ``ranks`` gets groups it must not use."""
        key = tuple(ranks)
        if key not in self._subsets:
            control = dist.new_group(ranks, backend="gloo", timeout=self.timeout)
            backend = "nccl" if self.device_type == "cuda" else "gloo"
            data = dist.new_group(ranks, backend=backend, timeout=self.timeout)
            position = ranks.index(self.env.rank) if self.env.rank in ranks else 0
            self._subsets[key] = (
                ControlGroup(control, rank=position, world_size=len(ranks)),
                data,
            )
        return self._subsets[key]

    def close(self) -> None:
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self._control = None
