"""A P2P receiver's reads when its worker keeps only some rows of some tensors (pure).

The worker reports, with the Ack of the plan (``wire.Keeps``), the rows of each tensor it reads
(a tensor-parallel rank: its shard along the tensor-parallel dim; see
``ckpt_engine.worker.update_weights_from_ipc(keeps=...)``). Given a bucket of the plan (each
tensor's offset in the slot, the owner's copy runs) and those rows, ``shard_copies`` gives the
byte ranges this receiver reads from the owner, each at the slot offset the whole tensor would
put it (so the worker's views, and its loader, are unchanged):

- rows along dim 0 (or along a later dim when every dim before it has size 1) of a row-major
  tensor are one contiguous byte range: read alone;
- rows along a later dim (a column shard: row-parallel weights, an expert's ``down_proj``) are
  one run per leading index, at a fixed stride: one strided range (``CopyRange.count`` runs).
  The tcp transport asks for it in one request per chunk and the owner packs the runs by one
  copy (``protocol.ReadRequest.count/stride``); Mooncake reads each run one-sided.
- tensors the worker did not list (replicated ones: norms) are read whole.

The rest of a partly read tensor's slot bytes are never written; the worker reads only its rows.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import NamedTuple

from ckpt_engine import dtypes
from ckpt_engine.errors import ProtocolError
from ckpt_engine.planner import Bucket, CopyRange


class Kept(NamedTuple):
    """Rows ``start`` .. ``start + length`` along ``dim`` of one tensor."""

    dim: int
    start: int
    length: int


def kept_range(
    shape: tuple[int, ...], itemsize: int, kept: Kept, *, name: str = "a tensor"
) -> tuple[int, int] | None:
    """Bytes ``[a, b)`` of a row-major tensor of ``shape`` holding ``kept``'s rows, when they
    are one contiguous range; None when strided (a column shard). ``name``: for the error."""
    dim, start, length = kept
    if not (0 <= dim < len(shape) and start >= 0 and start + length <= shape[dim]):
        raise ProtocolError(
            f"keeps of {name}: rows {start}+{length} along dim {dim} of a tensor of {list(shape)}"
        )
    if math.prod(shape[:dim]) != 1:
        return None
    unit = math.prod(shape[dim + 1 :]) * itemsize
    return start * unit, (start + length) * unit


def shard_copies(bucket: Bucket, kept: Mapping[str, Kept]) -> tuple[CopyRange, ...]:
    """The reads of one bucket for a receiver whose worker keeps ``kept`` (by tensor name):
    the bucket's copy runs cut to the kept bytes of each tensor, adjacent ones merged."""
    if not kept:
        return bucket.copies
    runs = sorted(bucket.copies, key=lambda c: c.dst)
    starts = [c.dst for c in runs]
    out: list[CopyRange] = []
    for item in bucket.items:
        if not item.nbytes:
            continue
        i = bisect.bisect_right(starts, item.offset) - 1
        if i < 0 or item.offset + item.nbytes > runs[i].dst + runs[i].nbytes:
            raise ValueError(f"bucket {bucket.id}: {item.name} lies in no copy run")
        run = runs[i]
        src = run.src + (item.offset - run.dst)
        rows = kept.get(item.name)
        itemsize = dtypes.itemsize(item.dtype)
        span = (
            None if rows is None else kept_range(item.shape, itemsize, rows, name=repr(item.name))
        )
        if rows is not None and span is None:  # a column shard: one strided range
            dim, start, length = rows
            unit = math.prod(item.shape[dim + 1 :]) * itemsize
            if length:
                out.append(
                    CopyRange(
                        run.buffer,
                        src + start * unit,
                        item.offset + start * unit,
                        length * unit,
                        count=math.prod(item.shape[:dim]),
                        stride=item.shape[dim] * unit,
                    )
                )
            continue
        a, b = span if span is not None else (0, item.nbytes)
        if a == b:
            continue
        piece = CopyRange(run.buffer, src + a, item.offset + a, b - a)
        last = out[-1] if out else None
        if (
            last is not None
            and last.count == 1
            and last.buffer == piece.buffer
            and last.src + last.nbytes == piece.src
            and last.dst + last.nbytes == piece.dst
        ):
            out[-1] = CopyRange(last.buffer, last.src, last.dst, last.nbytes + piece.nbytes)
        else:
            out.append(piece)
    return tuple(out)


def kept_by_name(manifest_names: tuple[str, ...], keeps) -> dict[str, Kept]:
    """A worker's ``wire.Keeps`` (manifest indices) by tensor name; ProtocolError for an index
    outside the manifest."""
    out = {}
    for i, dim, start, length in zip(
        keeps.indices, keeps.dims, keeps.starts, keeps.lengths, strict=True
    ):
        if i >= len(manifest_names):
            raise ProtocolError(f"keeps: tensor {i} of a manifest of {len(manifest_names)}")
        out[manifest_names[i]] = Kept(dim, start, length)
    return out
