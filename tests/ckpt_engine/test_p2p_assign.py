"""Bucket order and reader assignment of P2P updates (pure)."""

from __future__ import annotations

import random

import pytest

from ckpt_engine.metas import CheckpointMetas, RankMetas, TensorMeta
from ckpt_engine.p2p.assign import assign, fair_order
from ckpt_engine.planner import plan_buckets
from ckpt_engine.ps.p2p import p2p_plan


def _random_buckets(seed: int, owners: int, count: int, skew: int):
    rng = random.Random(seed)
    owner_of = [rng.randrange(owners) for _ in range(count)]
    sizes = [rng.randint(1, 100) * (skew if o == 0 else 1) for o in owner_of]
    return owner_of, sizes


@pytest.mark.parametrize(
    "owners,receivers,count,skew",
    [(1, 1, 5, 1), (2, 2, 40, 1), (2, 3, 41, 1), (4, 2, 100, 3), (3, 8, 7, 1), (8, 4, 200, 2)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_bucket_once_receivers_balanced(owners, receivers, count, skew, seed):
    owner_of, sizes = _random_buckets(seed, owners, count, skew)
    a = assign(owner_of, sizes, receivers)
    assert sorted(a.order) == list(range(count))
    assert all(0 <= r < receivers for r in a.reader)
    load = a.receiver_bytes(sizes, receivers)
    assert sum(load) == sum(sizes)
    if count >= receivers:
        assert max(load) - min(load) <= max(sizes)
    # every round of `receivers` consecutive buckets has distinct readers: all links busy
    for start in range(0, count, receivers):
        round_readers = a.reader[start : start + receivers]
        assert len(set(round_readers)) == len(round_readers)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_owners_progress_together(seed):
    """Owner 0 holds 3x the bytes: it sends ~3x as often, and no owner's share of bytes sent
    runs ahead of another's by more than one bucket."""
    owner_of, sizes = _random_buckets(seed, 3, 90, 3)
    totals = [sum(s for o, s in zip(owner_of, sizes) if o == k) for k in range(3)]
    sent = [0, 0, 0]
    for index in fair_order(owner_of, sizes):
        sent[owner_of[index]] += sizes[index]
        fractions = [sent[k] / totals[k] for k in range(3) if totals[k]]
        biggest = max(sizes[i] / totals[owner_of[i]] for i in range(90))
        assert max(fractions) - min(fractions) <= biggest + 1e-9


def test_order_keeps_each_owners_sequence():
    owner_of = [0, 0, 1, 1, 0, 1]
    order = fair_order(owner_of, [1] * 6)
    assert [i for i in order if owner_of[i] == 0] == [0, 1, 4]
    assert [i for i in order if owner_of[i] == 1] == [2, 3, 5]
    assert order[:2] in ([0, 2], [2, 0])


def test_empty_and_bad_inputs():
    assert assign([], [], 3).order == ()
    with pytest.raises(ValueError):
        assign([0], [1], 0)
    with pytest.raises(ValueError):
        assign([0, 1], [1], 2)


def test_p2p_plan_renumbers_and_sets_readers():
    ranks = []
    for r in range(2):
        tensors = tuple(
            TensorMeta(name=f"r{r}.t{i}", dtype="F32", shape=(64,), nbytes=256, buffer=0,
                       offset=256 * i)
            for i in range(10)
        )  # fmt: skip
        ranks.append(RankMetas(rank=r, device_key=f"k{r}", host="h", buffer_bytes=(2560,),
                               tensors=tensors))  # fmt: skip
    metas = CheckpointMetas(name="c", ranks=tuple(ranks))
    base = plan_buckets(metas, bucket_bytes=1024)
    plan, fetches = p2p_plan(base, [5, 7])
    assert [b.id for b in plan.buckets] == list(range(len(base.buckets)))
    assert {b.owner for b in plan.buckets} == {5, 7}
    assert sorted(i.name for b in plan.buckets for i in b.items) == sorted(
        t.name for r in ranks for t in r.tensors
    )
    for b in plan.buckets:
        fetch = fetches[b.id]
        assert fetch.bucket == b.id and fetch.copies == b.copies
        assert all(i.name.startswith(f"r{fetch.owner}.") for i in b.items)
