"""Many small device tensors into host buffers: packed on their device first, then one
device-to-host copy per segment (the trainer pattern at MoE scale, issue 17 item 5).

One ``copy_`` per tensor into pinned memory costs a cudaMemcpyAsync and half a dozen tensor
objects made in Python: with 150,735 MoE expert tensors of ~143 KB (21.5 GB), the registration
(these copies most of it) took 2.1-2.6 s of a step on 1x H200, where the link needs about
0.43 s (bench/RESULTS.md, issue 17 item 5). Here a segment is a run of tensors of one dtype,
adjacent in one host buffer (``plan``): on the device's current stream (so after the kernels
that produced them, in stream order), ``torch._utils._flatten_dense_tensors`` packs the
segment's tensors, with zero tensors for the ALIGN pads between them, into one new tensor laid
out as the segment is in the host buffer; then one device-to-host copy of it, on a copy stream
after an event of the current stream, straight into the pinned buffer.

Why that call: it makes each tensor contiguous and flat in C++ and concatenates them with
``torch.cat``, whose CUDA kernel copies many inputs per launch, bitwise (elements as opaque
bytes of their width; one dtype, so nothing is converted) when every input is contiguous, of
one dtype, and the output has fewer than 2^31 elements (hence MAX_STAGING_BYTES); a bool
tensor is packed as uint8 (a bool copy may turn bytes 2-255 into 1). Measured on a 2-core CPU,
150,000 tensors: 1.8 us a tensor, against 7 us for the views the fused ``torch._foreach_copy_``
needs (a destination made in Python per tensor, and the source reinterpreted as an integer:
its same-dtype copy goes through fp32 for bf16 and fp16, which canonicalizes NaN payloads).

Bounded device memory: at most two packed segments (of at most ``staging_bytes``, 256 MiB by
default: the link stays busy, the trainer keeps its memory) exist at once:
before packing segment k the host waits for segment k-2's copy to host, then drops it (freed in
order: its last reader has finished). A segment of one tensor is left to the caller's one copy
per tensor (packing it would add a device copy and save nothing), as is a segment whose pack
fails (that copy then names the tensor).

``copy_gathered`` returns once every device-to-host copy it queued has landed, also on failure
(the buffers may then go back to the pool); the sources are referenced by the caller for the
whole call and read only on their own current stream, so torch's allocator cannot hand out
their memory early. Every error names a tensor (CheckpointError).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch._utils import _flatten_dense_tensors

from ckpt_engine.errors import CheckpointError
from ckpt_engine.planner import ALIGN

logger = logging.getLogger(__name__)

STAGING_BYTES = 256 << 20  # a packed segment, at most (two exist at once)
MAX_STAGING_BYTES = 1 << 30  # torch.cat's batched kernel: fewer than 2^31 output elements
MIN_TENSORS = 16  # fewer gatherable tensors on a device: one copy each, as before
MAX_TENSOR_BYTES = 16 << 20  # larger tensors are copied alone (their per-call cost is noise)


@dataclass(frozen=True)
class Segment:
    """Tensors packed together: ``indices`` (in layout order), of one dtype, in host buffer
    ``buffer`` at bytes ``[start, start + nbytes)``, each followed by ``pads[j]`` bytes of pad
    (the last by none): they fill the range, so one copy to host writes exactly it."""

    buffer: int
    start: int
    nbytes: int
    indices: tuple[int, ...]
    pads: tuple[int, ...]


def plan(
    indices: Sequence[int],
    sizes: Sequence[int],
    where: Sequence[int],
    offsets: Sequence[int],
    kinds: Sequence[torch.dtype],
    *,
    staging_bytes: int = STAGING_BYTES,
) -> list[Segment]:
    """The segments of the tensors at ``indices`` (ascending, each of 1 to ``staging_bytes``
    bytes; ``kinds``: their dtypes, in the order of ``indices``; ``sizes``, ``where``,
    ``offsets``: every tensor's bytes, buffer and offset, as ckpt_engine.ps.named.pack lays
    them out: in index order within a buffer). A segment ends at a change of buffer or dtype,
    where a tensor with bytes that is not in ``indices`` lies between two of them, where the
    gap to the next is not a pad (under ALIGN, whole elements) or the next would pass
    ``staging_bytes``."""
    segments: list[Segment] = []
    members: list[int] = []
    pads: list[int] = []
    buffer = start = prev = end = -1
    kind = None

    def close() -> None:
        if members:
            segments.append(Segment(buffer, start, end - start, tuple(members), (*pads, 0)))

    for i, dtype in zip(indices, kinds):
        nbytes, b, offset = sizes[i], where[i], offsets[i]
        if not 0 < nbytes <= staging_bytes or i <= prev:
            raise ValueError(f"tensor {i}: {nbytes} bytes, after {prev} (plan's contract)")
        gap = offset - end
        if (
            b != buffer
            or dtype != kind
            or not 0 <= gap < ALIGN
            or gap % dtype.itemsize
            or offset + nbytes - start > staging_bytes
            or (i != prev + 1 and any(sizes[j] for j in range(prev + 1, i)))
        ):
            if b == buffer and offset < end:
                raise ValueError(f"tensor {i} at {offset} overlaps the one before (to {end})")
            close()
            buffer, start, kind, members, pads = b, offset, dtype, [], []
        else:
            pads.append(gap)
        members.append(i)
        prev, end = i, offset + nbytes
    close()
    return segments


def gatherable(
    tensors: Sequence[torch.Tensor],
    indices: Sequence[int],
    *,
    min_tensors: int | None = None,
    max_tensor_bytes: int | None = None,
) -> dict[torch.device, list[int]]:
    """Per CUDA device, the ``indices`` whose tensors are packed: on that device, of 1 to
    ``max_tensor_bytes`` bytes; none for a device with fewer than ``min_tensors`` of them
    (defaults: MAX_TENSOR_BYTES, MIN_TENSORS)."""
    min_tensors = min_tensors if min_tensors is not None else MIN_TENSORS
    max_tensor_bytes = max_tensor_bytes if max_tensor_bytes is not None else MAX_TENSOR_BYTES
    by_device: dict[torch.device, list[int]] = {}
    for i in indices:
        t = tensors[i]
        if t.is_cuda and 0 < t.nbytes <= max_tensor_bytes:
            by_device.setdefault(t.device, []).append(i)
    return {d: sorted(ix) for d, ix in by_device.items() if len(ix) >= min_tensors}


def pack(
    segment: Segment,
    tensors: Sequence[torch.Tensor],
    zeros: dict[tuple[torch.dtype, int], torch.Tensor],
) -> torch.Tensor:
    """``segment``'s bytes as one new uint8 tensor on the tensors' device, pads zero, queued on
    the current stream (device-agnostic: the CPU tests run it on host tensors). ``zeros``:
    the pad tensors made so far, by (dtype, bytes), reused."""
    parts = [tensors[i] for i in segment.indices]
    if parts[0].dtype == torch.bool:  # copied as bytes: a bool copy may turn 2-255 into 1
        parts = [t.view(torch.uint8) for t in parts]
    if any(segment.pads):
        padded: list[torch.Tensor] = []
        for t, pad in zip(parts, segment.pads):
            padded.append(t)
            if pad:  # zero bytes (a zero of the dtype may not be: float8_e8m0fnu has none)
                key = (t.dtype, pad)
                if key not in zeros:
                    zeros[key] = torch.zeros(pad, dtype=torch.uint8, device=t.device).view(t.dtype)
                padded.append(zeros[key])
        parts = padded
    with torch.no_grad():
        flat = _flatten_dense_tensors(parts)
    return flat.view(torch.uint8)


def copy_gathered(
    buffers: Sequence[torch.Tensor],
    names: Sequence[str],
    tensors: Sequence[torch.Tensor],
    indices: Sequence[int],
    sizes: Sequence[int],
    where: Sequence[int],
    offsets: Sequence[int],
    *,
    staging_bytes: int | None = None,
) -> list[int]:
    """Copy the ``gatherable`` tensors among ``indices`` into their host buffers by segments
    (``buffers``: each buffer's uint8 tensor, pinned; ``where``/``offsets``: each tensor's place
    there), returning once every copy landed, also on failure; returns the indices it did not
    copy, in order (not gatherable; alone in their segment; in a segment whose pack failed),
    for the caller's one copy per tensor."""
    staging = staging_bytes if staging_bytes is not None else STAGING_BYTES
    staging = max(ALIGN, min(staging, MAX_STAGING_BYTES))
    chosen = gatherable(tensors, indices, max_tensor_bytes=min(MAX_TENSOR_BYTES, staging))
    if not chosen:
        return list(indices)
    taken: set[int] = set()
    for device, ix in chosen.items():
        started = time.perf_counter()
        segments = plan(ix, sizes, where, offsets, [tensors[i].dtype for i in ix],
                        staging_bytes=staging)  # fmt: skip
        segments = [s for s in segments if len(s.indices) > 1]
        if not segments:
            continue
        copied = _copy_segments(device, segments, buffers, names, tensors)
        taken.update(i for s in copied for i in s.indices)
        logger.debug(
            "packed %d tensors (%d bytes) on %s into %d copies to host: %.3f s",
            sum(len(s.indices) for s in copied),
            sum(s.nbytes for s in copied),
            device,
            len(copied),
            time.perf_counter() - started,
        )
    return [i for i in indices if i not in taken]


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream the device-to-host copies run on (the GPU tests watch it)."""
    return torch.cuda.Stream(device=device)


def _copy_segments(
    device: torch.device,
    segments: Sequence[Segment],
    buffers: Sequence[torch.Tensor],
    names: Sequence[str],
    tensors: Sequence[torch.Tensor],
) -> list[Segment]:
    """``pack`` each segment on the current stream of ``device``, then copy it to host on a
    copy stream; returns the segments copied (a failed pack leaves its segment out) once the
    copy stream is idle, also on failure (module docstring)."""
    current = torch.cuda.current_stream(device)
    copier = _copy_stream(device)
    zeros: dict[tuple[torch.dtype, int], torch.Tensor] = {}
    in_flight: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # packed, its copy's event
    copied: list[Segment] = []
    try:
        for segment in segments:
            if len(in_flight) == 2:  # at most two packed segments at once
                flat, done = in_flight.pop(0)
                done.synchronize()
                del flat  # its copy to host has run: freed in order
            try:
                flat = pack(segment, tensors, zeros)
            except RuntimeError as e:  # left to the caller's copies, which name the tensor
                logger.debug(
                    "packing %d tensors failed (%s): one copy each", len(segment.indices), e
                )
                continue
            packed = torch.cuda.Event()
            packed.record(current)
            copier.wait_event(packed)
            host = buffers[segment.buffer][segment.start : segment.start + segment.nbytes]
            with torch.cuda.stream(copier):
                try:
                    host.copy_(flat, non_blocking=True)
                except RuntimeError as e:
                    raise CheckpointError(
                        f"named_tensors[{names[segment.indices[0]]!r}] and the "
                        f"{len(segment.indices) - 1} tensors after it: copy to host failed: {e}"
                    ) from e
                done = torch.cuda.Event()
                done.record(copier)
            in_flight.append((flat, done))  # dropped once ``done`` (so no record_stream)
            copied.append(segment)
    finally:
        copier.synchronize()
    return copied
