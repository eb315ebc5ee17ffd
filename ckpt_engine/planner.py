"""Bucket planning from gathered metas (pure).

A bucket is a set of tensors of one owner rank that fits one slot of the IPC buffer. The plan
is a function of the metas and the bucket size only, so every rank computes the same plan.

Within a bucket, tensors that lie back to back in one host buffer keep their relative layout in
the slot, so the owner copies each such run with one host-to-device copy (``copies``) instead
of one copy per tensor. A run is broken where the next tensor would be misaligned for its dtype
or the gap would exceed ``align`` bytes; every run starts ``align``-aligned in the slot.
A tensor larger than ``bucket_bytes`` gets a bucket of its own, and the slot grows to hold it.
Buckets of different owners alternate, so consecutive buckets come from different hosts' memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from ckpt_engine import dtypes, wire
from ckpt_engine.bulk import without_gc
from ckpt_engine.metas import CheckpointMetas, TensorMeta

ALIGN = 256


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


class BucketItem(NamedTuple):
    """A tensor in a bucket: ``nbytes`` bytes at ``offset`` from the start of the slot."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int


class StridedRuns:
    """``count`` runs of ``nbytes``, each ``stride`` bytes after the previous (a record with
    those three fields: CopyRange here, the P2P transport's ReadRange)."""

    count: int
    stride: int
    nbytes: int

    @property
    def span(self) -> int:
        """Bytes from the first run's start to the last run's end."""
        return (self.count - 1) * self.stride + self.nbytes

    @property
    def total(self) -> int:
        """Bytes of the runs."""
        return self.count * self.nbytes


@dataclass(frozen=True)
class CopyRange(StridedRuns):
    """Owner-side copy: ``nbytes`` bytes of host buffer ``buffer`` at ``src`` to slot ``dst``.
    ``count`` > 1 (only in a P2P receiver's reads of column shards, ``p2p/shards.py``; plans
    have single runs): ``count`` runs of ``nbytes``, each ``stride`` after the previous on both
    sides."""

    buffer: int
    src: int
    dst: int
    nbytes: int
    count: int = 1
    stride: int = 0


@dataclass(frozen=True)
class Bucket:
    id: int
    owner: int
    nbytes: int  # bytes of the slot this bucket uses
    items: tuple[BucketItem, ...]
    copies: tuple[CopyRange, ...]


@dataclass(frozen=True)
class BucketPlan:
    slot_bytes: int
    buckets: tuple[Bucket, ...]

    @property
    def num_tensors(self) -> int:
        return sum(len(b.items) for b in self.buckets)

    @cached_property
    @without_gc
    def manifest(self) -> wire.Manifest:
        """Every tensor in delivery order, as the wire's columns (built once per plan)."""
        items = [i for b in self.buckets for i in b.items]
        return wire.Manifest(
            tuple(i.name for i in items),
            tuple(i.dtype for i in items),
            tuple(i.shape for i in items),
        )

    @cached_property
    @without_gc
    def layout(self) -> wire.Layout:
        """Tensors per bucket and each tensor's offset in its slot (built once per plan)."""
        return wire.Layout(
            tuple(len(b.items) for b in self.buckets),
            tuple(i.offset for b in self.buckets for i in b.items),
        )


class _BucketBuilder:
    def __init__(self, owner: int, capacity: int, align: int) -> None:
        self.owner, self.capacity, self.align = owner, capacity, align
        self.items: list[BucketItem] = []
        self.copies: list[CopyRange] = []
        self.end = 0  # first free byte of the slot
        self._run: list[int] | None = None  # [buffer, src_start, dst_start, src_end]

    def add(self, t: TensorMeta, itemsize: int, *, force: bool = False) -> bool:
        """Add ``t`` if it fits (always with ``force``); False if it does not.

        A tensor extends the current run when it lies in the same host buffer, at most
        ``align`` bytes after the run's end, at an offset keeping its dtype aligned; else it
        starts a new ``align``-aligned run."""
        nbytes = t.nbytes
        if nbytes == 0:
            self.items.append(
                BucketItem(
                    t.name,
                    t.dtype,
                    t.shape,
                    0,
                    (self.end + self.align - 1) // self.align * self.align,
                )
            )
            return True
        run = self._run
        offset = None
        if run is not None:
            gap = t.offset - run[3]
            if t.buffer == run[0] and 0 <= gap <= self.align and not (t.offset - run[1]) % itemsize:
                offset = run[2] + (t.offset - run[1])
        extends = offset is not None
        if not extends:
            offset = (self.end + self.align - 1) // self.align * self.align
        if offset + nbytes > self.capacity and not force:
            return False
        if not extends:
            self._close_run()
            run = self._run = [t.buffer, t.offset, offset, t.offset]
        run[3] = t.offset + nbytes
        if offset + nbytes > self.end:
            self.end = offset + nbytes
        self.items.append(BucketItem(t.name, t.dtype, t.shape, nbytes, offset))
        return True

    def _close_run(self) -> None:
        if self._run is not None:
            buffer, src_start, dst_start, src_end = self._run
            self.copies.append(CopyRange(buffer, src_start, dst_start, src_end - src_start))
            self._run = None

    def build(self, bucket_id: int) -> Bucket:
        self._close_run()
        return Bucket(bucket_id, self.owner, self.end, tuple(self.items), tuple(self.copies))


def _owner_buckets(owner: int, tensors: tuple[TensorMeta, ...], bucket_bytes: int, align: int):
    ordered = sorted(tensors, key=lambda t: (t.buffer, t.offset, t.name))
    sizes = {d: dtypes.itemsize(d) for d in {t.dtype for t in ordered}}
    builders: list[_BucketBuilder] = []
    current: _BucketBuilder | None = None
    for t in ordered:
        size = sizes[t.dtype]
        if t.nbytes > bucket_bytes:  # an oversized tensor gets a bucket of its own
            alone = _BucketBuilder(owner, t.nbytes, align)
            alone.add(t, size, force=True)
            builders.append(alone)
            continue
        if current is None or not current.add(t, size):
            current = _BucketBuilder(owner, bucket_bytes, align)
            builders.append(current)
            current.add(t, size, force=True)
    return builders


@without_gc
def plan_buckets(metas: CheckpointMetas, *, bucket_bytes: int, align: int = ALIGN) -> BucketPlan:
    """Plan the buckets of one update; the same metas and sizes give the same plan everywhere."""
    if bucket_bytes < align:
        raise ValueError(f"bucket_bytes {bucket_bytes} is smaller than the alignment {align}")
    per_owner = [_owner_buckets(r.rank, r.tensors, bucket_bytes, align) for r in metas.ranks]
    interleaved: list[_BucketBuilder] = []
    for i in range(max((len(b) for b in per_owner), default=0)):
        interleaved.extend(b[i] for b in per_owner if i < len(b))
    buckets = tuple(builder.build(i) for i, builder in enumerate(interleaved))
    slot = align_up(max((b.nbytes for b in buckets), default=0), align)
    return BucketPlan(slot_bytes=max(slot, align), buckets=buckets)


def largest_tensor_bytes(metas: CheckpointMetas) -> int:
    return max((t.nbytes for r in metas.ranks for t in r.tensors), default=0)
