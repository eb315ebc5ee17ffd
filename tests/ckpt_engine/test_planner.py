import pytest

from ckpt_engine import dtypes
from ckpt_engine.metas import CheckpointMetas, RankMetas, TensorMeta
from ckpt_engine.planner import ALIGN, plan_buckets


def t(name, dtype, shape, offset, buffer=0):
    return TensorMeta(
        name=name,
        dtype=dtype,
        shape=shape,
        nbytes=dtypes.nbytes_of(dtype, shape),
        buffer=buffer,
        offset=offset,
    )


def metas(*per_rank):
    ranks = []
    for r, tensors in enumerate(per_rank):
        nbuf = max((x.buffer for x in tensors), default=-1) + 1
        sizes = tuple(
            max((x.offset + x.nbytes for x in tensors if x.buffer == b), default=0)
            for b in range(nbuf)
        )
        ranks.append(
            RankMetas(
                rank=r, device_key=f"k{r}", host="h", buffer_bytes=sizes, tensors=tuple(tensors)
            )
        )
    return CheckpointMetas(name="m", ranks=tuple(ranks))


def check_invariants(m, plan):
    names = [i.name for b in plan.buckets for i in b.items]
    assert sorted(names) == sorted(x.name for r in m.ranks for x in r.tensors)  # each exactly once
    assert [b.id for b in plan.buckets] == list(range(len(plan.buckets)))
    owner = {x.name: (r.rank, x) for r in m.ranks for x in r.tensors}
    for b in plan.buckets:
        assert b.nbytes <= plan.slot_bytes
        for i in b.items:
            rank, meta = owner[i.name]
            assert rank == b.owner
            assert i.offset % dtypes.itemsize(i.dtype) == 0
            assert i.offset + i.nbytes <= b.nbytes or i.nbytes == 0
            # the copies put this tensor's bytes exactly where the item says
            if i.nbytes:
                hits = [
                    c
                    for c in b.copies
                    if c.buffer == meta.buffer
                    and c.src <= meta.offset
                    and meta.offset + meta.nbytes <= c.src + c.nbytes
                ]
                assert len(hits) == 1
                assert hits[0].dst + (meta.offset - hits[0].src) == i.offset
        for c in b.copies:
            assert c.dst % ALIGN == 0


def test_contiguous_tensors_are_one_copy():
    m = metas([t("a", "F32", (4,), 0), t("b", "F32", (4,), 16), t("c", "BF16", (8,), 32)])
    plan = plan_buckets(m, bucket_bytes=4096)
    check_invariants(m, plan)
    (bucket,) = plan.buckets
    assert len(bucket.copies) == 1 and bucket.copies[0].nbytes == 48


def test_misaligned_tensor_starts_a_new_run():
    m = metas([t("flag", "BOOL", (3,), 0), t("x", "F32", (2,), 3)])
    plan = plan_buckets(m, bucket_bytes=4096)
    check_invariants(m, plan)
    assert len(plan.buckets[0].copies) == 2


def test_large_gap_starts_a_new_run():
    m = metas([t("a", "F32", (1,), 0), t("b", "F32", (1,), 4 + ALIGN + 4)])
    check_invariants(m, plan := plan_buckets(m, bucket_bytes=4096))
    assert len(plan.buckets[0].copies) == 2


def test_other_buffer_starts_a_new_run():
    m = metas([t("a", "F32", (4,), 0, buffer=0), t("b", "F32", (4,), 16, buffer=1)])
    check_invariants(m, plan := plan_buckets(m, bucket_bytes=4096))
    assert len(plan.buckets[0].copies) == 2


def test_oversized_tensor_gets_its_own_bucket_and_grows_the_slot():
    m = metas(
        [
            t("small", "F32", (10,), 0),
            t("huge", "F32", (3000,), 64),
            t("tail", "F32", (1,), 64 + 12000),
        ]
    )
    plan = plan_buckets(m, bucket_bytes=1024)
    check_invariants(m, plan)
    huge = [b for b in plan.buckets if any(i.name == "huge" for i in b.items)]
    assert len(huge) == 1 and len(huge[0].items) == 1
    assert plan.slot_bytes >= 12000


def test_buckets_respect_size_and_alternate_owners():
    r0 = [t(f"a{i}", "F32", (64,), 256 * i) for i in range(8)]
    r1 = [t(f"b{i}", "F32", (64,), 256 * i) for i in range(8)]
    m = metas(r0, r1)
    plan = plan_buckets(m, bucket_bytes=1024)
    check_invariants(m, plan)
    assert all(b.nbytes <= 1024 for b in plan.buckets)
    assert [b.owner for b in plan.buckets] == [0, 1] * (len(plan.buckets) // 2)


def test_zero_sized_tensors_and_empty_ranks():
    m = metas([t("e", "BF16", (0, 3), 0), t("s", "F64", (), 0)], [])
    plan = plan_buckets(m, bucket_bytes=4096)
    check_invariants(m, plan)
    assert plan.num_tensors == 2


def test_no_tensors_at_all():
    plan = plan_buckets(metas([], []), bucket_bytes=4096)
    assert plan.buckets == () and plan.slot_bytes == ALIGN


def test_deterministic():
    m = metas([t(f"x{i}", "I8", (i % 5 + 1,), 8 * i) for i in range(50)], [t("y", "F16", (3,), 0)])
    assert plan_buckets(m, bucket_bytes=512) == plan_buckets(m, bucket_bytes=512)
    check_invariants(m, plan_buckets(m, bucket_bytes=512))


def test_bucket_smaller_than_alignment_is_rejected():
    with pytest.raises(ValueError, match="alignment"):
        plan_buckets(metas([]), bucket_bytes=ALIGN - 1)
