"""The tensor-parallel group of the reference server and its two collectives.

Layers receive a `TensorParallel` record instead of reading global state, so a layer of rank r of
size n can be built (and its weight loading tested) in one process without any process group.
The rendezvous store lives in the front process (`host_store`), bound to a port the OS chooses,
so no port is ever fixed and nothing races for it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group (`group` is None when size == 1)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"invalid tensor-parallel rank {self.rank} of size {self.size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns `x`."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_list(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x` (same shape on every rank), in rank order."""
        if self.size == 1:
            return [x]
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(out, x, group=self.group)
        return out

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim`, in rank order."""
        if self.size == 1:
            return x
        return torch.cat(self.all_gather_list(x), dim=dim)


def host_store(timeout_s: float) -> dist.TCPStore:
    """The rendezvous store, hosted by the caller (the front) on an OS-chosen loopback port."""
    return dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def init_tensor_parallel(
    *, rank: int, size: int, store_port: int, device: torch.device, timeout_s: float
) -> TensorParallel:
    """Join the group through the front's store: NCCL on CUDA, gloo on CPU."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timeout)
    if device.type == "cuda":
        dist.init_process_group(
            "nccl", store=store, rank=rank, world_size=size, timeout=timeout, device_id=device
        )
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=timeout)
    group = dist.group.WORLD
    # One collective now, so a broken group fails at startup rather than on the first request.
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe, group=group)
    if int(probe.item()) != size:
        raise RuntimeError(f"tensor-parallel probe summed to {probe.item()}, expected {size}")
    return TensorParallel(rank=rank, size=size, group=group)


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
