"""Which receiving rank reads which bucket, and in what order (pure).

Goal (the upstream checkpoint-engine's issue #25): no single owner's or receiver's link is the
bottleneck. Every bucket is read once, by one receiver, from its one owner, then broadcast over
the receivers; each receiver prefetches its next buckets while others are broadcast, so the
reads of consecutive buckets run at the same time. Hence:

1. order: a fair merge of the owners' buckets by progress -- the next bucket comes from the
   owner that has sent the smallest share of its bytes so far -- so every owner is busy for the
   whole update, an owner holding twice the bytes sending twice as often;
2. readers: consecutive buckets form rounds of ``receivers`` buckets; in each round every
   receiver reads exactly one bucket (all links busy at once), the largest bucket of the round
   going to the receiver that has read the fewest bytes so far. So each receiver's total differs
   from any other's by at most the largest bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Assignment:
    """``order[i]`` is the input index of the i-th bucket to move; ``reader[i]`` reads it."""

    order: tuple[int, ...]
    reader: tuple[int, ...]

    def receiver_bytes(self, sizes: Sequence[int], receivers: int) -> list[int]:
        total = [0] * receivers
        for index, r in zip(self.order, self.reader):
            total[r] += sizes[index]
        return total


def fair_order(owners: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """Bucket indices merged over owners by progress (ties: lower owner, then input order)."""
    queues: dict[int, list[int]] = {}
    totals: dict[int, int] = {}
    for i, (owner, size) in enumerate(zip(owners, sizes)):
        queues.setdefault(owner, []).append(i)
        totals[owner] = totals.get(owner, 0) + size
    sent = dict.fromkeys(queues, 0)
    heads = dict.fromkeys(queues, 0)
    order: list[int] = []
    while len(order) < len(owners):
        live = [o for o in queues if heads[o] < len(queues[o])]
        # progress as an exact fraction; an owner of only empty buckets counts as done
        owner = min(live, key=lambda o: (sent[o] * 1.0 / totals[o] if totals[o] else 1.0, o))
        index = queues[owner][heads[owner]]
        heads[owner] += 1
        sent[owner] += sizes[index]
        order.append(index)
    return order


def assign(owners: Sequence[int], sizes: Sequence[int], receivers: int) -> Assignment:
    """Order the buckets (``owners[i]``, ``sizes[i]``) and give each one a reader."""
    if receivers < 1:
        raise ValueError(f"receivers must be >= 1, got {receivers}")
    if len(owners) != len(sizes):
        raise ValueError("owners and sizes differ in length")
    order = fair_order(owners, sizes)
    load = [0] * receivers
    reader = [0] * len(order)
    for start in range(0, len(order), receivers):
        positions = range(start, min(start + receivers, len(order)))
        by_size = sorted(positions, key=lambda p: (-sizes[order[p]], p))
        by_load = sorted(range(receivers), key=lambda r: (load[r], r))
        for p, r in zip(by_size, by_load):
            reader[p] = r
            load[r] += sizes[order[p]]
    return Assignment(order=tuple(order), reader=tuple(reader))
