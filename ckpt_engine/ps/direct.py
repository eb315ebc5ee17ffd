"""DirectSources: ``register_and_update``'s named tensors that live on the rank's own device
(the trainer pattern: a gathered FSDP / Megatron shard on the GPU that the inference worker
shares) go into the IPC slots straight from that memory, while their host copy fills in the
background.

Which tensors (``is_direct``, decided per tensor): a tensor with bytes, contiguous, on exactly
the parameter server's device (``cuda:<its index>``; on a CPU parameter server, host memory);
none when a registration has more than ``MAX_TENSORS`` of them (10^5 MoE experts: the per-tensor
calls cost more than the overlap gains).
Every other tensor (another GPU, host memory on a GPU parameter server, strided, empty) takes
the registration's usual path: copied into its host buffer before the update starts
(ckpt_engine.ps.named), and the mover copies it host-to-device as any file's bytes.

The two copies of a direct tensor, both from the same source bytes:
- into the host buffer (the copy that must end complete: P2P readers and later updates of the
  checkpoint read it): GPU: device-to-host on a stream of its own, queued at registration after
  an event of the device's current stream (the kernels that produced the tensors); CPU: memcpy
  on a background thread;
- into the slot (``fill``, called by the mover for every copy run of a buffer that holds a
  direct tensor; ckpt_engine.ps.sources cuts the run): GPU: device-to-device on the mover's
  stream, which first waits for the same event; CPU: memcpy. Host-held tensors of a mixed run
  are copied from the host buffer as before. A run of many small direct tensors (MoE experts;
  ``sources.from_host``) is copied whole from the host buffer instead, once that buffer's host
  copy has landed (GPU: the mover's stream waits for an event recorded after it; CPU: the
  mover waits for the copy thread, until its deadline).
So the update does not wait for the device-to-host copy: a step costs about the longer of the
two, not their sum.

Lifetime: the references to the trainer's memory are held from registration until ``close``;
``register_and_update`` closes once the update ended and the host copy is complete (``wait``),
so the trainer may change its tensors when it returns. ``close`` (also on every failure, by
unregistering) waits for every queued host copy first, so no copy lands in a buffer handed
back to the pool; on GPU each source storage is also marked as used by the streams that read
it (``record_stream``), so torch does not hand its memory out while a queued copy still reads it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from ckpt_engine.errors import CheckpointError
from ckpt_engine.progress import Progress
from ckpt_engine.ps.named import copy_host
from ckpt_engine.ps.sources import HOST, SourceMap, Span, from_host

# Past this many direct tensors in one registration, none is direct: each costs more calls than
# the host path (a copy queued, a storage marked, a piece of the fill), and with many small
# tensors that outweighs the overlap. Measured, 1x H200, `bench/watch.py --modes trainer
# --workload moe --tensors 150000` (150,735 tensors, 21.47 GB): direct 5.5-6.5 s a step, host
# path 3.9-4.2 s; the dense 270-tensor workload: direct 0.354 s, host path 0.641 s.
MAX_TENSORS = 10_000


def is_direct(tensor: torch.Tensor, device: torch.device | None) -> bool:
    """Whether ``tensor`` is copied into the slots straight from its memory (module docstring)."""
    return (
        device is not None
        and tensor.device == device
        and tensor.nbytes > 0
        and tensor.is_contiguous()
    )


def direct_indices(tensors: Sequence[torch.Tensor], device: torch.device | None) -> list[int]:
    """The indices of ``tensors`` one registration reads in place: those ``is_direct`` says,
    none when they are more than ``MAX_TENSORS``."""
    direct = [i for i, t in enumerate(tensors) if is_direct(t, device)]
    return direct if len(direct) <= MAX_TENSORS else []


def _storage_bytes(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The whole storage under ``tensor`` as uint8, and the tensor's byte offset in it."""
    storage = tensor.untyped_storage()
    flat = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
    return flat, tensor.data_ptr() - storage.data_ptr()


class DirectSources:
    """The direct tensors of one registration (``indices`` into ``named``) and their host copy.

    ``buffers``: the checkpoint's host buffers (uint8 tensors, pinned on GPU), ``where`` /
    ``offsets``: each named tensor's buffer (index into ``buffers``) and offset there."""

    def __init__(
        self,
        named: Mapping[str, torch.Tensor],
        indices: Sequence[int],
        *,
        buffers: Sequence[torch.Tensor],
        where: Sequence[int],
        offsets: Sequence[int],
        device: torch.device,
        threads: int,
    ) -> None:
        names, tensors = list(named), list(named.values())
        self.device = device
        self._names = names
        self._storages: list[torch.Tensor] = []
        keys: dict[int, int] = {}  # storage address -> its index
        spans: list[Span] = []
        direct = set(indices)
        for i, t in enumerate(tensors):
            if t.nbytes == 0:
                continue
            if i not in direct:
                spans.append(Span(where[i], offsets[i], t.nbytes, HOST, 0, i))
                continue
            flat, soffset = _storage_bytes(t)
            s = keys.setdefault(flat.data_ptr(), len(self._storages))
            if s == len(self._storages):
                self._storages.append(flat)
            spans.append(Span(where[i], offsets[i], t.nbytes, s, soffset, i))
        self.map = SourceMap(spans)
        self._buffers = list(buffers)
        self._cuda = device.type == "cuda"
        self._streams: set[int] = set()  # streams already recorded on every source storage
        self._future: Future | None = None
        self._done: torch.cuda.Event | None = None
        # each buffer's host copy landed: GPU events on the copy stream, CPU threading events
        self._landed: dict[int, torch.cuda.Event | threading.Event] = {}
        self._error: BaseException | None = None  # CPU: the copy thread's failure
        self.ready: torch.cuda.Event | None = None  # GPU: the sources' producers are done
        self.started = time.perf_counter()
        self.finished: float | None = None
        try:
            self._start_host_copy(threads)
        except BaseException:
            self.close()  # waits for the copies queued before the failure
            raise

    def _start_host_copy(self, threads: int) -> None:
        by_buffer = {
            b: self.map.host_copies(b, self._buffers[b].numel()) for b in self.map.buffers()
        }
        if not self._cuda:
            jobs = {
                b: [[self._buffers[b].data_ptr() + p.dst,
                     self._storages[p.storage].data_ptr() + p.src, p.nbytes] for p in pieces]
                for b, pieces in by_buffer.items()
            }  # fmt: skip
            self._landed = {b: threading.Event() for b in jobs}
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-copy")
            self._future = self._executor.submit(self._copy_on_cpu, jobs, threads)
            return
        self.ready = torch.cuda.Event()
        self.ready.record(torch.cuda.current_stream(self.device))
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_event(self.ready)
        self._record(stream)
        self._done = torch.cuda.Event()
        try:
            with torch.cuda.stream(stream):
                for b, pieces in by_buffer.items():
                    for p in pieces:
                        dst = self._buffers[b][p.dst : p.dst + p.nbytes]
                        src = self._storages[p.storage][p.src : p.src + p.nbytes]
                        try:
                            dst.copy_(src, non_blocking=True)
                        except RuntimeError as e:
                            name = self._names[self.map.tensor_at(b, p.dst)]
                            raise CheckpointError(
                                f"named_tensors[{name!r}]: copy to host failed: {e}"
                            ) from e
                    self._landed[b] = torch.cuda.Event()
                    self._landed[b].record(stream)
        finally:  # also after a failed enqueue: close() waits for what was queued
            self._done.record(stream)

    def _copy_on_cpu(self, jobs: dict[int, list[list[int]]], threads: int) -> None:
        try:
            for b, buffer_jobs in jobs.items():
                total = sum(n for _, _, n in buffer_jobs)
                with Progress("host copy", total, rank=0, mode="off") as progress:
                    copy_host(buffer_jobs, threads=threads, progress=progress)
                self._landed[b].set()
        except BaseException as e:  # raised by whoever waits (``wait``, ``_await_host``)
            self._error = e
            raise
        finally:
            for event in self._landed.values():
                event.set()
        self.finished = time.perf_counter()

    def _record(self, stream: torch.cuda.Stream) -> None:
        """Mark every source storage as read on ``stream`` (torch's allocator then keeps its
        memory until that stream's queued work is done, even once our references are gone)."""
        if stream.cuda_stream in self._streams:
            return
        self._streams.add(stream.cuda_stream)
        for flat in self._storages:
            flat.record_stream(stream)

    # -- the mover's side ------------------------------------------------------------------------
    def covers(self, buffer: int) -> bool:
        """Whether copy runs of ``buffer`` go through ``fill``."""
        return self.map.covers(buffer)

    def fill(
        self, view: torch.Tensor, buffer: int, src: int, dst: int, nbytes: int, deadline: float
    ) -> None:
        """Copy bytes ``[src, src + nbytes)`` of ``buffer``'s tensors into ``view[dst:]``: the
        direct ones from their own memory, the others from the host buffer; or, for a run of
        many small direct ones, all from the host buffer once its host copy landed. GPU:
        queued on the current stream (the mover's), after the sources' producers; CPU: done
        on return (waiting for the host copy at most until ``deadline``)."""
        if self._storages is None:
            raise CheckpointError("named tensors released: the registration has ended")
        non_blocking = self._cuda
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(self.ready)
            self._record(stream)
        pieces = self.map.pieces(buffer, src, nbytes, dst)
        if from_host(pieces):
            self._await_host(buffer, deadline)
            whole = self._buffers[buffer][src : src + nbytes]
            view[dst : dst + nbytes].copy_(whole, non_blocking=non_blocking)
            return
        for p in pieces:
            if p.storage == HOST:
                source = self._buffers[buffer][p.src : p.src + p.nbytes]
            else:
                source = self._storages[p.storage][p.src : p.src + p.nbytes]
            view[p.dst : p.dst + p.nbytes].copy_(source, non_blocking=non_blocking)

    def _await_host(self, buffer: int, deadline: float) -> None:
        """GPU: the current stream waits for ``buffer``'s host copy; CPU: the host does (until
        ``deadline``), raising the copy's error."""
        landed = self._landed[buffer]
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(landed)
            return
        if not landed.wait(max(0.0, deadline - time.monotonic())):
            raise CheckpointError("named tensors: the host copy did not finish in time")
        if self._error is not None:
            raise CheckpointError(f"named tensors: the host copy failed: {self._error}")

    # -- completion ------------------------------------------------------------------------------
    def wait(self, deadline: float) -> None:
        """Until the host copy is complete; CheckpointError if not by ``deadline``
        (``time.monotonic()``), or the copy's own error."""
        if self._future is not None:
            try:
                self._future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise CheckpointError(
                    "named tensors: the host copy did not finish in time"
                ) from None
            except Exception as e:
                raise CheckpointError(f"named tensors: the host copy failed: {e}") from e
            return
        while not self._done.query():
            if time.monotonic() > deadline:
                raise CheckpointError("named tensors: the host copy did not finish in time")
            time.sleep(0.0005)
        if self.finished is None:
            self.finished = time.perf_counter()

    def close(self) -> None:
        """Wait for every queued host copy (a local copy: it ends), then drop every reference
        to the named tensors. Idempotent."""
        if self._future is not None:
            self._future.exception()  # waits; its error, if any, was raised by ``wait``
            self._executor.shutdown(wait=True)
            self._future = None
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        self._storages = None
        self._buffers = []
        self._landed = {}
        self.ready = None
