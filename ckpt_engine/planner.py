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

from ckpt_engine.metas import CheckpointMetas, TensorMeta

ALIGN = 256


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class BucketItem:
    """A tensor in a bucket: ``nbytes`` bytes at ``offset`` from the start of the slot."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int


@dataclass(frozen=True)
class CopyRange:
    """Owner-side copy: ``nbytes`` bytes of host buffer ``buffer`` at ``src`` to slot ``dst``."""

    buffer: int
    src: int
    dst: int
    nbytes: int


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


class _BucketBuilder:
    def __init__(self, owner: int, capacity: int, align: int) -> None:
        self.owner, self.capacity, self.align = owner, capacity, align
        self.items: list[BucketItem] = []
        self.copies: list[CopyRange] = []
        self.end = 0  # first free byte of the slot
        self._run: list[int] | None = None  # [buffer, src_start, dst_start, src_end]

    def _run_offset(self, t: TensorMeta) -> int | None:
        """Slot offset of ``t`` if it extends the current run, else None."""
        if self._run is None:
            return None
        buffer, src_start, dst_start, src_end = self._run
        gap = t.offset - src_end
        if t.buffer != buffer or not 0 <= gap <= self.align:
            return None
        if (t.offset - src_start) % t.itemsize:
            return None
        return dst_start + (t.offset - src_start)

    def fits(self, t: TensorMeta) -> bool:
        if t.nbytes == 0:
            return True
        offset = self._run_offset(t)
        if offset is None:
            offset = align_up(self.end, self.align)
        return offset + t.nbytes <= self.capacity

    def add(self, t: TensorMeta) -> None:
        if t.nbytes == 0:
            offset = align_up(self.end, self.align)
        else:
            offset = self._run_offset(t)
            if offset is None:
                self._close_run()
                offset = align_up(self.end, self.align)
                self._run = [t.buffer, t.offset, offset, t.offset]
            self._run[3] = t.offset + t.nbytes
            self.end = max(self.end, offset + t.nbytes)
        self.items.append(BucketItem(t.name, t.dtype, t.shape, t.nbytes, offset))

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
    builders: list[_BucketBuilder] = []
    current: _BucketBuilder | None = None
    for t in ordered:
        if t.nbytes > bucket_bytes:  # an oversized tensor gets a bucket of its own
            alone = _BucketBuilder(owner, t.nbytes, align)
            alone.add(t)
            builders.append(alone)
            continue
        if current is None or not current.fits(t):
            current = _BucketBuilder(owner, bucket_bytes, align)
            builders.append(current)
        current.add(t)
    return builders


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
