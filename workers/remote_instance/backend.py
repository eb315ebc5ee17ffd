"""The transfer seam of a fork: a small interface, and a registry of implementations by name.

A `TransferBackend` opens a `TransferGroup` between one seed rank (group rank 0, the source,
which hosts the rendezvous store) and one client rank (group rank 1). A group moves raw bytes
only (`send`/`recv` of a tensor viewed as uint8), so any dtype crosses (float8 included), and the
receiver writes straight into the destination tensor. Every blocking step has a deadline: the
rendezvous, each transfer, `flush`. A later RDMA transfer engine registers here under its own
name and implements the same three calls.

Registered: "nccl" (CUDA tensors, NVLink/IB through NCCL) and "gloo" (CPU tensors, TCP). Both use
a process group built directly on a `TCPStore` (prefixed by the group name), independent of the
server's own TP group, so a rank can hold several at once (one per forking client).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.distributed as dist

from workers.errors import ConfigError, TransferError

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64  # NCCL: transfers queued ahead of the host before it waits for the oldest


class TransferGroup(ABC):
    """A connected pair: rank 0 sends, rank 1 receives, tensor by tensor in an agreed order."""

    @abstractmethod
    def send(self, tensor: torch.Tensor) -> None: ...

    @abstractmethod
    def recv(self, tensor: torch.Tensor) -> None:
        """Receive into `tensor` (contiguous), in place."""

    @abstractmethod
    def flush(self) -> None:
        """Return when every transfer so far has completed; `TransferError` past the deadline."""

    @abstractmethod
    def close(self) -> None: ...


class TransferBackend(ABC):
    name: ClassVar[str]
    device_type: ClassVar[str]  # the device its tensors live on: "cuda" or "cpu"

    @abstractmethod
    def connect(
        self,
        *,
        master_address: str,
        port: int,
        group_rank: int,
        group_name: str,
        timeout: float,
        device: torch.device,
    ) -> TransferGroup:
        """Join (rank 0: host) the two-rank group; returns once both ends are connected."""


class _TorchGroup(TransferGroup):
    """A two-rank torch.distributed process group (gloo or NCCL), used directly."""

    def __init__(self, pg, store, *, rank: int, timeout: float, name: str, sync: bool) -> None:
        self.pg, self.store = pg, store
        self.rank, self.timeout, self.name = rank, timeout, name
        self.sync = sync  # gloo: each op waits (its own timeout); NCCL: queued, polled
        self.pending: collections.deque = collections.deque()
        self._closing = threading.Lock()  # close() may run on a background thread (close_later)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        flat = tensor.detach().reshape(-1)
        data = flat.view(torch.uint8) if flat.numel() else flat
        work = self.pg.broadcast([data], opts)
        if self.sync:
            work.wait()
            return
        work.wait()  # NCCL: the current stream waits for the transfer; the host does not
        # Completion is polled on an event recorded on that stream after the transfer (a plain
        # CUDA event query), not on the Work object.
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(data.device))
        self.pending.append(done)
        if len(self.pending) > MAX_IN_FLIGHT:
            self._drain(MAX_IN_FLIGHT // 2)

    def send(self, tensor: torch.Tensor) -> None:
        self._broadcast(tensor)

    def recv(self, tensor: torch.Tensor) -> None:
        if not tensor.is_contiguous():
            raise TransferError(f"{self.name}: receive buffer is not contiguous")
        self._broadcast(tensor)

    def _drain(self, keep: int) -> None:
        """Poll the oldest transfers until at most `keep` remain; a transfer that makes no
        progress within the timeout aborts the group (NCCL cannot be interrupted otherwise)."""
        last = time.monotonic()
        while len(self.pending) > keep:
            if self.pending[0].query():
                self.pending.popleft()
                last = time.monotonic()
            elif time.monotonic() - last > self.timeout:
                self.pending.clear()
                self.close()
                raise TransferError(f"{self.name}: no progress for {self.timeout:.0f} s")
            else:
                time.sleep(0.0005)

    def flush(self) -> None:
        self._drain(0)

    def close(self) -> None:
        with self._closing:
            pg, self.pg = self.pg, None
        if pg is None:
            return
        # NCCL: always abort. It is local, where shutdown (finalize) can wait on the peer's
        # proxy: a seed that shuts down before answering the client, while the client keeps its
        # end open until that answer, would wait out the timeout. Every transfer has completed
        # by now (`flush`) unless this is a failure, where abort is needed anyway.
        try:
            if not self.sync and hasattr(pg, "abort"):
                pg.abort()
            elif hasattr(pg, "shutdown"):
                pg.shutdown()
        except Exception as e:  # closing is best effort: the group is dropped either way
            logger.debug("closing %s: %r", self.name, e)
        self.store = None


def close_later(groups: Sequence[TransferGroup], device: torch.device) -> threading.Thread:
    """Close `groups` on a daemon thread. Once a transfer has been flushed every byte has landed,
    and tearing a communicator down (NCCL: about 0.5 s per end, measured on H200s) need not delay
    the caller: the seed's lock, during which its requests wait, or the client's start. Closing
    is idempotent, so a later `close()` on the caller's side (a `finally`) is harmless."""

    def run() -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        for group in groups:
            group.close()

    thread = threading.Thread(target=run, name="fork-close", daemon=True)
    thread.start()
    return thread


class _TorchBackend(TransferBackend):
    def connect(self, *, master_address, port, group_rank, group_name, timeout, device):
        delta = datetime.timedelta(seconds=timeout)
        try:
            store = dist.TCPStore(
                master_address,
                port,
                world_size=2,
                is_master=group_rank == 0,
                wait_for_workers=False,
                timeout=delta,
            )
            prefixed = dist.PrefixStore(f"ckpt-engine-fork/{group_name}/", store)
            pg = self._group(prefixed, group_rank, delta, device)
            group = _TorchGroup(
                pg, store, rank=group_rank, timeout=timeout, name=group_name, sync=self.sync
            )
            probe = torch.full((1,), 7 if group_rank == 0 else 0, dtype=torch.uint8, device=device)
            group._broadcast(probe)  # both ends connected, or fail now
            group.flush()
        except TransferError:
            raise
        except Exception as e:
            where = f"{master_address}:{port}"
            raise TransferError(f"{group_name}: cannot form the group at {where}: {e}") from e
        if int(probe.item()) != 7:
            group.close()
            raise TransferError(f"{group_name}: handshake returned {int(probe.item())}, not 7")
        return group

    sync: ClassVar[bool]

    def _group(self, store, rank: int, timeout: datetime.timedelta, device: torch.device): ...


class GlooBackend(_TorchBackend):
    name = "gloo"
    device_type = "cpu"
    sync = True

    def _group(self, store, rank, timeout, device):
        return dist.ProcessGroupGloo(store, rank, 2, timeout)


_NCCL_ENV_LOCK = threading.Lock()
_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


@contextlib.contextmanager
def _no_teardown_on_error():
    """Build a group whose NCCL errors are ours to handle: torch's default (tear the process
    down on a communicator error or watchdog timeout) would kill a seed that keeps serving when a
    client dies mid-transfer. torch reads the mode from the environment in the group's
    constructor only, so it is set for that call (under a lock) and restored."""
    with _NCCL_ENV_LOCK:
        old = os.environ.get(_ERROR_HANDLING)
        os.environ[_ERROR_HANDLING] = "0"
        try:
            yield
        finally:
            if old is None:
                del os.environ[_ERROR_HANDLING]
            else:
                os.environ[_ERROR_HANDLING] = old


class NcclBackend(_TorchBackend):
    name = "nccl"
    device_type = "cuda"
    sync = False

    def _group(self, store, rank, timeout, device):
        opts = dist.ProcessGroupNCCL.Options()
        # The watchdog's limit is set past ours, so our own poll (`_drain`) fails first and
        # aborts the communicator.
        opts._timeout = timeout * 2 + datetime.timedelta(seconds=60)
        with _no_teardown_on_error():
            return dist.ProcessGroupNCCL(store, rank, 2, opts)


TRANSFER_BACKENDS: dict[str, type[TransferBackend]] = {
    NcclBackend.name: NcclBackend,
    GlooBackend.name: GlooBackend,
}


def get_backend(name: str) -> TransferBackend:
    if name not in TRANSFER_BACKENDS:
        raise ConfigError(
            f"unknown remote-instance backend {name!r}; supported: {', '.join(TRANSFER_BACKENDS)}"
        )
    return TRANSFER_BACKENDS[name]()


def default_backend(device_type: str) -> str:
    return next(n for n, b in TRANSFER_BACKENDS.items() if b.device_type == device_type)
