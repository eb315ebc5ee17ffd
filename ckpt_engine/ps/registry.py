"""Registered checkpoints of one rank: host buffers plus the metadata of every tensor in them.

Registration is all or nothing: headers are parsed and names checked before any memory is
allocated, and on any failure every buffer allocated so far is freed again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_engine import dtypes, host_memory
from ckpt_engine.bulk import without_gc
from ckpt_engine.errors import CheckpointError, CheckpointFileError
from ckpt_engine.metas import TensorMeta
from ckpt_engine.planner import ALIGN, align_up
from ckpt_engine.pool import HostPool
from ckpt_engine.progress import Progress
from ckpt_engine.ps.staging import StagedReads
from ckpt_engine.safetensors_io import ReadJob, SafetensorsHeader, read_header, read_parallel

logger = logging.getLogger(__name__)

NAMED_TENSORS_SOURCE = "<named_tensors>"
NAMED_CHUNK_BYTES = 1 << 30  # named tensors are packed into buffers of about this size
PROGRESS_STEP_BYTES = 64 << 20  # named-tensor copies report progress in steps of this size


@dataclass
class RegisteredCheckpoint:
    """One checkpoint held by this rank: ``tensors[i]`` lives in ``buffers[tensors[i].buffer]``."""

    name: str
    buffers: list[host_memory.HostBuffer] = field(default_factory=list)
    sources: list[str] = field(
        default_factory=list
    )  # file path (or NAMED_TENSORS_SOURCE) per buffer
    tensors: tuple[TensorMeta, ...] = ()
    # The CheckpointMetas object last found to describe this checkpoint (update's local check).
    checked_metas: object = field(default=None, repr=False, compare=False)
    # File reads still running (register(..., defer_reads=True)); None once registered whole.
    reads: StagedReads | None = field(default=None, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def bytes_of(self, meta: TensorMeta) -> torch.Tensor:
        """The raw bytes of one tensor (uint8 view into host memory)."""
        return self.buffers[meta.buffer].tensor[meta.offset : meta.offset + meta.nbytes]

    def get_tensor(self, name: str) -> torch.Tensor:
        """A typed view of one registered tensor (no copy)."""
        for meta in self.tensors:
            if meta.name == name:
                raw = self.bytes_of(meta)
                if meta.nbytes == 0:
                    return torch.empty(meta.shape, dtype=dtypes.to_torch(meta.dtype))
                return raw.view(dtypes.to_torch(meta.dtype)).reshape(meta.shape)
        raise KeyError(name)

    def close(self) -> None:
        if self.reads is not None:
            self.reads.close()  # no read may still write into a buffer handed back
        for buf in self.buffers:
            buf.close()
        self.buffers = []


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:40]


def _check_named(named: Mapping[str, torch.Tensor]) -> None:
    # whole-collection checks first (10^5 expert tensors); the per-tensor loop only to name
    # the offender
    names, tensors = list(named), list(named.values())
    if (
        (not names or (set(map(type, names)) == {str} and all(names)))
        and all(isinstance(t, torch.Tensor) for t in tensors)
        and {t.layout for t in tensors} <= {torch.strided}
        and "meta" not in {t.device.type for t in tensors}
        and all(map(dtypes.is_storable, {t.dtype for t in tensors}))
    ):
        return
    for name, tensor in named.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"named_tensors: key {name!r} is not a non-empty string")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"named_tensors[{name!r}] is a {type(tensor).__name__}, not a tensor"
            )
        try:
            dtypes.from_torch(tensor.dtype)
        except ValueError as e:
            raise CheckpointError(f"named_tensors[{name!r}]: {e}") from None
        if tensor.is_sparse or tensor.layout != torch.strided:
            raise CheckpointError(f"named_tensors[{name!r}] is not a dense tensor")
        if tensor.is_meta:
            raise CheckpointError(f"named_tensors[{name!r}] is on the meta device: no data")


def copy_into(dst: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Copy ``tensor``'s bytes into the host bytes ``dst`` (uint8, as many bytes) by torch: a
    strided host tensor, or a tensor in device memory (a trainer's weights on its GPU). Device
    memory is copied straight into ``dst`` (pinned: the registry pins before it copies), queued
    on the device's current stream, so it runs after the kernels that produced the tensor and
    no pageable host copy is made; returns True when such a copy is queued, and the caller
    synchronizes that stream once before the bytes are read. (A strided device tensor is made
    contiguous on its device first; that temporary is freed in stream order.)"""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    queued = flat.device.type == "cuda"
    dst.copy_(flat, non_blocking=queued)
    return queued


class Registry:
    """The checkpoints registered on this rank, by name."""

    def __init__(
        self,
        *,
        host_memory_kind: str,
        shm_dir: str,
        pin: bool,
        pin_in_place: bool,
        read_threads: int,
        label: str,
        pool_bytes: int = 0,
        rank: int = 0,
    ) -> None:
        self._kind = host_memory_kind
        # buffers handed back by unregister, taken again by the next register (ckpt_engine.pool)
        self.pool = HostPool(kind=host_memory_kind, shm_dir=shm_dir, max_bytes=pool_bytes)
        self._shm_dir = shm_dir
        self._pin = pin
        self._pin_in_place = pin_in_place
        self._threads = read_threads
        self._label = label
        self._rank = rank  # rank 0 shows the progress of registrations (ckpt_engine.progress)
        self._checkpoints: dict[str, RegisteredCheckpoint] = {}

    def names(self) -> list[str]:
        return list(self._checkpoints)

    def get(self, name: str) -> RegisteredCheckpoint:
        try:
            return self._checkpoints[name]
        except KeyError:
            raise CheckpointError(
                f"checkpoint {name!r} is not registered; registered: {self.names() or 'none'}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._checkpoints

    @without_gc
    def register(
        self,
        name: str,
        *,
        files: Sequence[str | os.PathLike] = (),
        named_tensors: Mapping[str, torch.Tensor] | None = None,
        defer_reads: bool = False,
    ) -> RegisteredCheckpoint:
        """``defer_reads``: return once the buffers are ready, with the file reads running in
        the background (``ckpt.reads``; see ckpt_engine.ps.staging); files are then always
        copied into host buffers, never mapped in place."""
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"checkpoint name must be a non-empty string, got {name!r}")
        if name in self._checkpoints:
            raise CheckpointError(f"checkpoint {name!r} is already registered")
        if isinstance(files, (str, os.PathLike)):
            raise CheckpointError("files must be a list of paths, not a single path")
        named = dict(named_tensors or {})
        _check_named(named)
        headers = [read_header(os.fspath(f)) for f in files]
        self._check_unique(headers, named)
        ckpt = RegisteredCheckpoint(name=name)
        try:
            metas = self._load_files(ckpt, headers, label=_label(name), defer=defer_reads)
            metas += self._load_named(ckpt, named, label=_label(name))
            ckpt.tensors = tuple(metas)
        except BaseException:
            ckpt.close()
            raise
        self._checkpoints[name] = ckpt
        logger.info(
            "registered %r: %d tensors, %d bytes in %d buffers",
            name,
            len(ckpt.tensors),
            ckpt.nbytes,
            len(ckpt.buffers),
        )
        return ckpt

    def unregister(self, name: str) -> None:
        self.get(name).close()
        del self._checkpoints[name]

    def close(self) -> None:
        for name in list(self._checkpoints):
            self.unregister(name)
        self.pool.close()

    @staticmethod
    def _check_unique(headers: list[SafetensorsHeader], named: Mapping[str, torch.Tensor]) -> None:
        seen: dict[str, str] = {}
        for header in headers:
            for t in header.tensors:
                if t.name in seen:
                    raise CheckpointFileError(
                        header.path,
                        f"the same tensor name twice: {t.name!r} (also in {seen[t.name]})",
                    )
                seen[t.name] = header.path
        for tname in named:
            if tname in seen:
                raise CheckpointFileError(
                    seen[tname], f"the same tensor name twice: {tname!r} (also in named_tensors)"
                )

    def _parallel(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``fn`` over ``items`` on the read threads (allocating: fallocate releases the GIL),
        results in order. If any call fails, the buffers the others made are closed and the
        first error is raised."""
        if len(items) <= 1 or self._threads <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self._threads, len(items))) as pool:
            futures = [pool.submit(fn, item) for item in items]
            results, error = [], None
            for future in futures:
                try:
                    results.append(future.result())
                except BaseException as e:
                    error = error or e
        if error is not None:
            for made in results:
                (made[0] if isinstance(made, tuple) else made).close()
            raise error
        return results

    def _pin_all(self, buffers: list[host_memory.HostBuffer]) -> None:
        populate_s, register_s = host_memory.pin_all(buffers, threads=self._threads)
        logger.info(
            "pinned %d bytes in %d buffers: page tables %.2f s, cudaHostRegister %.2f s",
            sum(b.nbytes for b in buffers),
            len(buffers),
            populate_s,
            register_s,
        )

    def _load_files(
        self,
        ckpt: RegisteredCheckpoint,
        headers: list[SafetensorsHeader],
        *,
        label: str,
        defer: bool = False,
    ) -> list[TensorMeta]:
        in_place = self._pin_in_place and not defer

        def make(header: SafetensorsHeader) -> tuple[host_memory.HostBuffer, int]:
            if in_place and host_memory.in_shm_dir(header.path, self._shm_dir):
                return host_memory.map_in_place(header.path, pin=False), header.data_start
            buf = self.pool.take(header.data_bytes, label=f"{self._label}-{label}")
            return buf, 0

        jobs: list[ReadJob] = []
        job_buffers: list[int] = []
        metas: list[TensorMeta] = []
        made = self._parallel(make, headers)
        first = len(ckpt.buffers)
        for header, (buf, _) in zip(headers, made):
            ckpt.buffers.append(buf)  # owned by ckpt from here: closed with it on failure
            ckpt.sources.append(header.path)
        if self._pin:
            self._pin_all(ckpt.buffers[first:])
        for index, (header, (buf, base)) in enumerate(zip(headers, made), start=first):
            if base == 0 and header.data_bytes:
                jobs.append(ReadJob(header.path, header.data_start, buf.memoryview()))
                job_buffers.append(index)
            metas.extend(
                TensorMeta(t.name, t.dtype, t.shape, t.end - t.begin, index, base + t.begin)
                for t in header.tensors
            )
        if defer:
            ckpt.reads = StagedReads(jobs, job_buffers, threads=self._threads)
        else:
            total = sum(job.dest.nbytes for job in jobs)
            with Progress(f"register {label!r}", total, rank=self._rank) as progress:
                read_parallel(jobs, threads=self._threads, on_read=progress.advance)
        return metas

    def _copy_host(self, jobs: list[list[int]], *, label: str = "") -> None:
        """memcpy each (dst, src, nbytes) on the read threads, in runs of about equal bytes.

        One torch ``copy_`` per tensor costs a dispatch and a parallel region each: 10^5
        expert tensors of a few hundred KB ran at about 3 GB/s that way. ctypes.memmove drops
        the GIL, so the threads copy in parallel at memory bandwidth."""
        if not jobs:
            return
        total = sum(n for _, _, n in jobs)
        parts = max(1, min(self._threads, len(jobs)))
        runs: list[list[list[int]]] = [[]]
        share, acc = total / parts, 0
        for job in jobs:
            if acc >= share * len(runs) and len(runs) < parts:
                runs.append([])
            runs[-1].append(job)
            acc += job[2]

        progress = Progress(f"register {label!r}", total, rank=self._rank)

        def copy(run: list[list[int]]) -> None:
            pending = 0  # reported in steps of PROGRESS_STEP_BYTES: one lock per step, not
            for dst, src, nbytes in run:  # per tensor (10^5 tensors, 16 threads)
                ctypes.memmove(dst, src, nbytes)
                pending += nbytes
                if pending >= PROGRESS_STEP_BYTES:
                    progress.advance(pending)
                    pending = 0
            progress.advance(pending)

        with progress:
            if len(runs) == 1:
                copy(runs[0])
                return
            with ThreadPoolExecutor(max_workers=len(runs)) as pool:
                list(pool.map(copy, runs))

    def _load_named(
        self, ckpt: RegisteredCheckpoint, named: Mapping[str, torch.Tensor], *, label: str
    ) -> list[TensorMeta]:
        """Pack the tensors, in order, into buffers of about NAMED_CHUNK_BYTES (a larger tensor
        gets one of its own), allocated and pinned in parallel (or taken from the pool, pinned
        already); then copy them in (contiguous host tensors on the read threads, device and
        strided tensors by torch, device-to-host straight into the pinned buffers: `copy_into`)."""
        if not named:
            return []
        names, tensors = list(named), list(named.values())
        sizes = [t.nbytes for t in tensors]
        chunks: list[int] = []  # bytes of each buffer
        where: list[int] = []  # buffer (relative) of each tensor
        offsets: list[int] = []
        for nbytes in sizes:
            offset = align_up(chunks[-1], ALIGN) if chunks else 0
            if not chunks or (offset + nbytes > NAMED_CHUNK_BYTES and chunks[-1] > 0):
                chunks.append(0)
                offset = 0
            chunks[-1] = offset + nbytes
            where.append(len(chunks) - 1)
            offsets.append(offset)

        def make(nbytes: int) -> host_memory.HostBuffer:
            return self.pool.take(nbytes, label=f"{self._label}-{label}")

        first = len(ckpt.buffers)
        for buf in self._parallel(make, chunks):
            ckpt.buffers.append(buf)
            ckpt.sources.append(NAMED_TENSORS_SOURCE)
        if self._pin:
            self._pin_all(ckpt.buffers[first:])
        # (dst address, src address, bytes) of contiguous host tensors, merged where both
        # sides continue (views into one flat buffer, e.g. a trainer's); others by torch
        host_jobs: list[list[int]] = []
        bases = [b.tensor.data_ptr() for b in ckpt.buffers[first:]]
        devices: set[torch.device] = set()
        try:
            for name, tensor, nbytes, chunk, offset in zip(names, tensors, sizes, where, offsets):
                if not nbytes:
                    continue
                if tensor.is_cpu and tensor.is_contiguous():
                    dst, src = bases[chunk] + offset, tensor.data_ptr()
                    last = host_jobs[-1] if host_jobs else None
                    if last is not None and last[0] + last[2] == dst and last[1] + last[2] == src:
                        last[2] += nbytes
                    else:
                        host_jobs.append([dst, src, nbytes])
                else:  # device memory or strided: torch's copy
                    dst = ckpt.buffers[first + chunk].tensor[offset : offset + nbytes]
                    try:
                        if copy_into(dst, tensor):
                            devices.add(tensor.device)
                    except RuntimeError as e:
                        raise CheckpointError(f"named_tensors[{name!r}]: copy failed: {e}") from e
            kinds = [dtypes.from_torch(t.dtype) for t in tensors]
            shapes = [tuple(t.shape) for t in tensors]
            buffers = [first + w for w in where]
            metas = list(map(TensorMeta._make, zip(names, kinds, shapes, sizes, buffers, offsets)))
            self._copy_host(host_jobs, label=label)
        finally:
            for device in devices:  # copy_into's queued copies land before the pool reuses
                torch.cuda.current_stream(device).synchronize()
        return metas
