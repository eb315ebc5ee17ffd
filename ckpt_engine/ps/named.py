"""Named tensors (a trainer's weights, in host or device memory) into a rank's host buffers.

Pure planning (checks, packing into buffers, the copy list) apart from the copies themselves:
contiguous host tensors by memcpy on the read threads (``copy_host``), device and strided
tensors by torch (``copy_by_torch``). The registry (ckpt_engine.ps.registry) owns the buffers
and decides when each copy runs.
"""

from __future__ import annotations

import ctypes
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ckpt_engine import dtypes
from ckpt_engine.errors import CheckpointError
from ckpt_engine.metas import TensorMeta
from ckpt_engine.planner import ALIGN, align_up
from ckpt_engine.progress import Progress

NAMED_TENSORS_SOURCE = "<named_tensors>"
NAMED_CHUNK_BYTES = 1 << 30  # named tensors are packed into buffers of about this size
PROGRESS_STEP_BYTES = 64 << 20  # named-tensor copies report progress in steps of this size


def check_named(named: Mapping[str, torch.Tensor]) -> None:
    """CheckpointError naming the first entry that is not a non-empty name with a dense tensor
    of a storable dtype holding data."""
    # whole-collection checks first (10^5 expert tensors); the per-tensor loop only to name
    # the offender
    names, tensors = list(named), list(named.values())
    if (
        (not names or (set(map(type, names)) == {str} and all(names)))
        and all(isinstance(t, torch.Tensor) for t in tensors)
        and {t.layout for t in tensors} <= {torch.strided}
        and not any(t.is_meta for t in tensors)
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


def pack(sizes: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """Tensors of ``sizes`` bytes, in order, packed at ALIGN boundaries into buffers of about
    NAMED_CHUNK_BYTES (a larger tensor gets one of its own): the bytes of each buffer, and per
    tensor its buffer and offset."""
    chunks: list[int] = []
    where: list[int] = []
    offsets: list[int] = []
    for nbytes in sizes:
        offset = align_up(chunks[-1], ALIGN) if chunks else 0
        if not chunks or (offset + nbytes > NAMED_CHUNK_BYTES and chunks[-1] > 0):
            chunks.append(0)
            offset = 0
        chunks[-1] = offset + nbytes
        where.append(len(chunks) - 1)
        offsets.append(offset)
    return chunks, where, offsets


def metas_of(
    named: Mapping[str, torch.Tensor],
    sizes: Sequence[int],
    where: Sequence[int],
    offsets: Sequence[int],
    first: int,
) -> list[TensorMeta]:
    """The registry's record of each tensor; ``first``: the index of the first buffer."""
    torch_dtypes = [t.dtype for t in named.values()]
    spelled = {d: dtypes.from_torch(d) for d in set(torch_dtypes)}
    return list(
        map(
            TensorMeta,
            named,
            map(spelled.__getitem__, torch_dtypes),
            [tuple(t.shape) for t in named.values()],
            sizes,
            [first + w for w in where],
            offsets,
        )
    )


def plan_copies(
    tensors: Sequence[torch.Tensor],
    sizes: Sequence[int],
    where: Sequence[int],
    offsets: Sequence[int],
    bases: Sequence[int],
    skip: Collection[int] = (),
) -> tuple[list[list[int]], list[int]]:
    """``[dst address, src address, bytes]`` of the contiguous host tensors (``bases``: each
    buffer's address), merged where both sides continue (views into one flat buffer, e.g. a
    trainer's), and the indices of the tensors torch must copy (device memory, strided).
    The tensors at ``skip`` are copied elsewhere (ckpt_engine.ps.direct)."""
    host_jobs: list[list[int]] = []
    by_torch: list[int] = []
    last = [-1, -1, 0]
    skip = set(skip)
    for i, (tensor, nbytes, chunk, offset) in enumerate(zip(tensors, sizes, where, offsets)):
        if not nbytes or i in skip:
            continue
        if tensor.is_cpu and tensor.is_contiguous():
            dst, src = bases[chunk] + offset, tensor.data_ptr()
            if last[0] + last[2] == dst and last[1] + last[2] == src:
                last[2] += nbytes
            else:
                last = [dst, src, nbytes]
                host_jobs.append(last)
        else:
            by_torch.append(i)
    return host_jobs, by_torch


def copy_host(jobs: list[list[int]], *, threads: int, progress: Progress) -> None:
    """memcpy each (dst, src, nbytes) on ``threads`` threads, in runs of about equal bytes.

    One torch ``copy_`` per tensor costs a dispatch and a parallel region each: 10^5
    expert tensors of a few hundred KB ran at about 3 GB/s that way. ctypes.memmove drops
    the GIL, so the threads copy in parallel at memory bandwidth."""
    if not jobs:
        return
    total = sum(n for _, _, n in jobs)
    parts = max(1, min(threads, len(jobs)))
    runs: list[list[list[int]]] = [[]]
    share, acc = total / parts, 0
    for job in jobs:
        if acc >= share * len(runs) and len(runs) < parts:
            runs.append([])
        runs[-1].append(job)
        acc += job[2]

    def copy(run: list[list[int]]) -> None:
        pending = 0  # reported in steps of PROGRESS_STEP_BYTES: one lock per step, not
        for dst, src, nbytes in run:  # per tensor (10^5 tensors, 16 threads)
            ctypes.memmove(dst, src, nbytes)
            pending += nbytes
            if pending >= PROGRESS_STEP_BYTES:
                progress.advance(pending)
                pending = 0
        progress.advance(pending)

    if len(runs) == 1:
        copy(runs[0])
        return
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        list(pool.map(copy, runs))


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


def copy_by_torch(
    buffers: Sequence[torch.Tensor],
    named: Mapping[str, torch.Tensor],
    indices: Sequence[int],
    sizes: Sequence[int],
    where: Sequence[int],
    offsets: Sequence[int],
) -> None:
    """``copy_into`` for the tensors at ``indices`` (``buffers``: each buffer's uint8 tensor,
    pinned); returns once every queued device-to-host copy has landed, also on failure (the
    buffers may go back to the pool)."""
    names, tensors = list(named), list(named.values())
    devices: set[torch.device] = set()
    try:
        for i in indices:
            dst = buffers[where[i]][offsets[i] : offsets[i] + sizes[i]]
            try:
                if copy_into(dst, tensors[i]):
                    devices.add(tensors[i].device)
            except RuntimeError as e:
                raise CheckpointError(f"named_tensors[{names[i]!r}]: copy failed: {e}") from e
    finally:
        for device in devices:
            torch.cuda.current_stream(device).synchronize()
