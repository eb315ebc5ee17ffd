"""Named tensors (a trainer's weights, in host or device memory) into a rank's host buffers.

Pure planning (checks, packing into buffers, the copy list) apart from the copies themselves:
contiguous host tensors by batched memcpy on the read threads (``copy_host``;
ckpt_engine.ps.hostcopy), device and strided tensors by torch (``copy_by_torch``). The registry
(ckpt_engine.ps.registry) owns the buffers and decides when each copy runs.

Every step works on whole columns (10^5 expert tensors): each tensor attribute is read once per
tensor by ``map`` over the collection (a getter costs 0.2-0.6 us a tensor, a Python loop
iteration as much again), the rest is numpy; a per-tensor loop runs only to name an offender.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from itertools import compress
from operator import attrgetter

import numpy as np
import torch

from ckpt_engine import dtypes
from ckpt_engine.errors import CheckpointError
from ckpt_engine.metas import TensorMeta, meta_of_tuple
from ckpt_engine.planner import ALIGN
from ckpt_engine.progress import Progress
from ckpt_engine.ps.gather import copy_gathered
from ckpt_engine.ps.hostcopy import copy_ranges

NAMED_TENSORS_SOURCE = "<named_tensors>"
NAMED_CHUNK_BYTES = 1 << 30  # named tensors are packed into buffers of about this size

_PLAIN_TYPES = {torch.Tensor, torch.nn.Parameter}
_layout, _is_meta, _is_cpu = attrgetter("layout"), attrgetter("is_meta"), attrgetter("is_cpu")
_dtype, _shape, _nbytes = attrgetter("dtype"), attrgetter("shape"), attrgetter("nbytes")
# Made on a thread beside pinning and the copies (PLAN_BESIDE_PIN), whose threads need the
# interpreter lock for a moment between system calls, a column is read in slices and the lock
# let go briefly after each (else a waiter gets it only after the 5 ms switch interval).
SLICE = 4096
PAUSE_S = 50e-6
# Whether the registry makes the copy list and the records on a thread while the kernel fills
# the page tables (and pins), and the records while the copies run; else before either. Off
# until measured on a GPU host (bench/register_named.py --beside 1,0): the Python runs on an
# idle core there, but its allocations (1 mmap + 7 brk for the copy list, 23 mmaps for the
# records at 150k tensors, strace) each wait for the populating threads' hold of the
# address-space lock, a 64 MiB chunk each (~45 ms on the H200 host), and stall every thread
# that would start the next chunk meanwhile. CPU (2 cores, nothing idle), 150k x 16 KiB: page
# tables 0.38-0.42 s beside against 0.24-0.26 s alone, the registration 1.42 s against 1.57 s.
PLAN_BESIDE_PIN = False


def _pause() -> None:
    if PLAN_BESIDE_PIN:  # others may wait for the interpreter lock
        time.sleep(PAUSE_S)


def _column(getter: Callable, items: list, dtype: type) -> np.ndarray:
    """``getter`` of each item, as an array, read in slices with a pause after each."""
    out = np.empty(len(items), dtype=dtype)
    for lo in range(0, len(items), SLICE):
        part = items[lo : lo + SLICE]
        out[lo : lo + len(part)] = np.fromiter(map(getter, part), dtype=dtype, count=len(part))
        _pause()
    return out


def check_named(named: Mapping[str, torch.Tensor]) -> None:
    """CheckpointError naming the first entry that is not a non-empty name with a dense tensor
    of a storable dtype holding data."""
    # whole-collection checks first (10^5 expert tensors); the per-tensor loop only to name
    # the offender
    names, tensors = list(named), list(named.values())
    if (
        (not names or (set(map(type, names)) == {str} and all(names)))
        and (
            set(map(type, tensors)) <= _PLAIN_TYPES
            or all(isinstance(t, torch.Tensor) for t in tensors)
        )
        and set(map(_layout, tensors)) <= {torch.strided}
        and not any(map(_is_meta, tensors))
        and all(map(dtypes.is_storable, set(map(_dtype, tensors))))
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


def sizes_of(tensors: Sequence[torch.Tensor]) -> list[int]:
    """The bytes of each tensor."""
    return list(map(_nbytes, tensors))


def pack(sizes: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """Tensors of ``sizes`` bytes, in order, packed at ALIGN boundaries into buffers of about
    NAMED_CHUNK_BYTES (a larger tensor gets one of its own): the bytes of each buffer, and per
    tensor its buffer and offset.

    A buffer starting at tensor s holds tensor i at ``before[i] - before[s]`` (``before``: the
    aligned sizes of the tensors ahead, summed); tensor i > s opens the next buffer when it
    would end past NAMED_CHUNK_BYTES and the buffer holds bytes already. Found per buffer with
    numpy, not per tensor."""
    n = len(sizes)
    if not n:
        return [], [], []
    size = np.asarray(sizes, dtype=np.int64)
    before = np.zeros(n + 1, dtype=np.int64)
    np.cumsum((size + ALIGN - 1) // ALIGN * ALIGN, out=before[1:])
    starts = [0]
    while True:
        s = starts[-1]
        # past this index a tensor surely starts beyond the limit: search no further
        bound = min(n, int(np.searchsorted(before, before[s] + NAMED_CHUNK_BYTES, "right")) + 1)
        offset = before[s + 1 : bound] - before[s]
        opens = (offset + size[s + 1 : bound] > NAMED_CHUNK_BYTES) & (offset > 0)
        if not opens.any():
            break
        starts.append(s + 1 + int(opens.argmax()))
    first = np.asarray(starts, dtype=np.int64)
    where = np.zeros(n, dtype=np.int64)
    where[first[1:]] = 1
    np.cumsum(where, out=where)
    offsets = before[:n] - before[first[where]]
    last = np.append(first[1:], n) - 1
    chunks = offsets[last] + size[last]
    return chunks.tolist(), where.tolist(), offsets.tolist()


def metas_of(
    named: Mapping[str, torch.Tensor],
    sizes: Sequence[int],
    where: Sequence[int],
    offsets: Sequence[int],
    first: int,
) -> list[TensorMeta]:
    """The registry's record of each tensor; ``first``: the index of the first buffer.
    Made in slices, with a pause after each (see SLICE)."""
    names, tensors = list(named), list(named.values())
    buffers = list(map(first.__add__, where)) if first else where
    spelled: dict[torch.dtype, str] = {}
    out: list[TensorMeta] = []
    for lo in range(0, len(tensors), SLICE):
        hi = lo + SLICE
        part = tensors[lo:hi]
        torch_dtypes = list(map(_dtype, part))
        for d in set(torch_dtypes).difference(spelled):
            spelled[d] = dtypes.from_torch(d)
        kinds = map(spelled.__getitem__, torch_dtypes)
        shapes = [tuple(t.shape) for t in part]
        out += map(
            meta_of_tuple,
            zip(names[lo:hi], kinds, shapes, sizes[lo:hi], buffers[lo:hi], offsets[lo:hi]),
        )
        _pause()
    return out


def plan_copies(
    tensors: Sequence[torch.Tensor],
    sizes: Sequence[int],
    where: Sequence[int],
    offsets: Sequence[int],
    bases: Sequence[int],
    skip: Collection[int] = (),
) -> tuple[np.ndarray, list[int]]:
    """``[dst address, src address, bytes]`` rows (an int64 array) of the contiguous host
    tensors (``bases``: each buffer's address), merged where both sides continue (views into
    one flat buffer, e.g. a trainer's), and the indices of the tensors torch must copy (device
    memory, strided). The tensors at ``skip`` are copied elsewhere (ckpt_engine.ps.direct)."""
    n = len(tensors)
    size = np.asarray(sizes, dtype=np.int64).reshape(n)
    tensors = list(tensors)
    on_host = _column(_is_cpu, tensors, bool)
    if on_host.all():
        dense = _column(torch.Tensor.is_contiguous, tensors, bool)
    else:
        dense = np.fromiter((t.is_cpu and t.is_contiguous() for t in tensors), bool, count=n)
    wanted = size > 0
    if skip:
        wanted[np.fromiter(skip, dtype=np.int64, count=len(skip))] = False
    by_torch = np.flatnonzero(wanted & ~(on_host & dense)).tolist()
    mine = wanted & on_host & dense
    picked = np.flatnonzero(mine)
    src = _column(torch.Tensor.data_ptr, list(compress(tensors, mine.tolist())), np.int64)
    dst = np.asarray(bases, dtype=np.int64)[np.asarray(where, dtype=np.int64)[picked]]
    dst += np.asarray(offsets, dtype=np.int64)[picked]
    nbytes = size[picked]
    run_starts = np.ones(len(picked), dtype=bool)  # where a run does not continue the last
    run_starts[1:] = (dst[1:] != dst[:-1] + nbytes[:-1]) | (src[1:] != src[:-1] + nbytes[:-1])
    starts = np.flatnonzero(run_starts)
    jobs = np.empty((len(starts), 3), dtype=np.int64)
    jobs[:, 0], jobs[:, 1] = dst[starts], src[starts]
    jobs[:, 2] = np.add.reduceat(nbytes, starts) if len(starts) else 0
    return jobs, by_torch


def copy_host(
    jobs: Sequence[Sequence[int]] | np.ndarray,
    *,
    threads: int,
    progress: Progress,
    fault_in: bool = False,
) -> None:
    """Copy each ``[dst, src, nbytes]`` row on ``threads`` threads (ckpt_engine.ps.hostcopy).

    One torch ``copy_`` per tensor costs a dispatch and a parallel region each: 10^5
    expert tensors of a few hundred KB ran at about 3 GB/s that way; one ctypes.memmove per
    tensor takes the interpreter lock per tensor. ``process_vm_writev`` copies up to 1024
    ranges a call without it; ``fault_in``: into new buffers (``hostcopy.call_for``)."""
    copy_ranges(jobs, threads=threads, on_copied=progress.advance, fault_in=fault_in)


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
    pinned), many small device tensors gathered on their device first (ckpt_engine.ps.gather);
    returns once every queued device-to-host copy has landed, also on failure (the
    buffers may go back to the pool)."""
    names, tensors = list(named), list(named.values())
    indices = copy_gathered(buffers, names, tensors, indices, sizes, where, offsets)
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
