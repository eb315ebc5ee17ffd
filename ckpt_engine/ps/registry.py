"""Registered checkpoints of one rank: host buffers plus the metadata of every tensor in them.

Registration is all or nothing: headers are parsed and names checked before any memory is
allocated, and on any failure every buffer allocated so far is freed again.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_engine import dtypes, host_memory
from ckpt_engine.bulk import without_gc
from ckpt_engine.errors import CheckpointError, CheckpointFileError
from ckpt_engine.metas import TensorMeta
from ckpt_engine.pool import HostPool
from ckpt_engine.progress import Progress
from ckpt_engine.ps import hostcopy
from ckpt_engine.ps import named as named_mod
from ckpt_engine.ps.direct import DirectSources, direct_indices
from ckpt_engine.ps.named import (
    NAMED_TENSORS_SOURCE,
    check_named,
    copy_by_torch,
    copy_host,
    metas_of,
    pack,
    plan_copies,
    sizes_of,
)
from ckpt_engine.ps.staging import StagedReads
from ckpt_engine.safetensors_io import ReadJob, SafetensorsHeader, read_header, read_parallel

logger = logging.getLogger(__name__)


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
    # Named tensors on this rank's device, read by the update straight from there while their
    # host copy runs (register(..., defer_reads=True); ckpt_engine.ps.direct); None once whole.
    direct: DirectSources | None = field(default=None, repr=False, compare=False)

    @property
    def pending(self) -> bool:
        """Whether the host copy may still be incomplete (reads or named copies running)."""
        return self.reads is not None or self.direct is not None

    def settle(self, deadline: float) -> dict[str, float]:
        """Wait until the host copy is complete (raising the first read or copy error), then
        drop the deferred state (and with it every reference to named tensors): the
        checkpoint is then as after a plain registration. Returns the seconds of the reads
        (first to last chunk), of the mover's waits for bytes, and of the named host copy."""
        timings: dict[str, float] = {}
        if self.reads is not None:
            reads = self.reads
            reads.wait_all(deadline)
            reads.close()
            self.reads = None
            timings["reads"] = (reads.finished or reads.started) - reads.started
            timings["mover_waited"] = reads.waited_s
        if self.direct is not None:
            direct = self.direct
            direct.wait(deadline)
            direct.close()
            self.direct = None
            timings["host_copy"] = (direct.finished or direct.started) - direct.started
        return timings

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
        if self.direct is not None:
            self.direct.close()  # nor a queued device-to-host copy
            self.direct = None
        for buf in self.buffers:
            buf.close()
        self.buffers = []


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:40]


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
        device: torch.device | None = None,
    ) -> None:
        self._kind = host_memory_kind
        self._device = device  # named tensors there are read in place by register_and_update
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
        copied into host buffers, never mapped in place; named tensors on this rank's device
        are copied into host memory in the background too, and the update reads them where
        they are (``ckpt.direct``; ckpt_engine.ps.direct). ``ckpt.settle`` ends both."""
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"checkpoint name must be a non-empty string, got {name!r}")
        if name in self._checkpoints:
            raise CheckpointError(f"checkpoint {name!r} is already registered")
        if isinstance(files, (str, os.PathLike)):
            raise CheckpointError("files must be a list of paths, not a single path")
        named = dict(named_tensors or {})
        check_named(named)
        headers = [read_header(os.fspath(f)) for f in files]
        self._check_unique(headers, named)
        ckpt = RegisteredCheckpoint(name=name)
        try:
            metas = self._load_files(ckpt, headers, label=_label(name), defer=defer_reads)
            metas += self._load_named(ckpt, named, label=_label(name), defer=defer_reads)
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

    def _load_named(
        self,
        ckpt: RegisteredCheckpoint,
        named: Mapping[str, torch.Tensor],
        *,
        label: str,
        defer: bool = False,
    ) -> list[TensorMeta]:
        """Pack the tensors into buffers taken from the pool (pinned already when reused;
        ckpt_engine.ps.named), copy the contiguous host tensors in on the read threads (into
        new buffers first, by process_vm_readv, which faults their pages in, then pin them;
        ckpt_engine.ps.hostcopy), then device and strided tensors by torch, device-to-host
        straight into the pinned buffers. ``defer``: the tensors on this rank's device
        (``direct.direct_indices``) are copied in the background instead (``ckpt.direct``).

        Pinning runs before or after the copies, not beside them: measured on the H200 host,
        filling the page tables while the copies touch the same buffers took 3.5 s instead of
        0.7 s (150,000 named tensors, 21.5 GB: 6.7 s in all against 3.4 s one after the
        other; 16 files: 4.8 s against 1.5 s). The copy list and the records read no buffer:
        with ``named.PLAN_BESIDE_PIN`` they are made on a thread while the kernel pins and
        copies (see there)."""
        if not named:
            return []
        tensors = list(named.values())
        sizes = sizes_of(tensors)
        chunks, where, offsets = pack(sizes)

        def make(nbytes: int) -> host_memory.HostBuffer:
            return self.pool.take(nbytes, label=f"{self._label}-{label}")

        first = len(ckpt.buffers)
        for buf in self._parallel(make, chunks):
            ckpt.buffers.append(buf)
            ckpt.sources.append(NAMED_TENSORS_SOURCE)
        buffers = ckpt.buffers[first:]
        bases = [b.tensor.data_ptr() for b in buffers]
        direct = direct_indices(tensors, self._device) if defer else []

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="named-plan") as helper:
            planned = helper.submit(plan_copies, tensors, sizes, where, offsets, bases, direct)
            recorded = helper.submit(metas_of, named, sizes, where, offsets, first)
            if not named_mod.PLAN_BESIDE_PIN:
                wait([planned, recorded])
            # new buffers: process_vm_readv faults their pages in as it copies (huge pages, on
            # the copy threads), pinned after; writev's are pinned or populated first
            new = self._pin and any(not b.pinned for b in buffers)
            call = hostcopy.call_for(fault_in=new)
            copy_first = call == "readv"
            if self._pin and not copy_first:
                self._pin_all(buffers)
            elif call == "writev":  # which faults pages in one at a time
                host_memory.populate_all(buffers, threads=self._threads)
            host_jobs, by_torch = planned.result()

            def copy_in() -> None:
                total = int(host_jobs[:, 2].sum())
                with Progress(f"register {label!r}", total, rank=self._rank) as progress:
                    copy_host(host_jobs, threads=self._threads, progress=progress, fault_in=new)

            if copy_first:
                copy_in()
                if self._pin:
                    self._pin_all(buffers)
            if direct:  # queued first: the device-to-host copies overlap the host copies below
                ckpt.direct = DirectSources(
                    named,
                    direct,
                    buffers=[b.tensor for b in ckpt.buffers],
                    where=[first + w for w in where],
                    offsets=offsets,
                    device=self._device,
                    threads=self._threads,
                )
            if not copy_first:
                copy_in()
            copy_by_torch([b.tensor for b in buffers], named, by_torch, sizes, where, offsets)
            metas = recorded.result()
        return metas
