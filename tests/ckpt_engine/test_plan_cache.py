"""The per-checkpoint plan cache of an update (ps/context.choose_plan) and the local check's
memo: reused only for the same metas object and bucket size; the memory check runs always."""

import pytest

from ckpt_engine import PSConfig
from ckpt_engine.metas import CheckpointMetas, RankMetas, TensorMeta
from ckpt_engine.ps.context import choose_plan


def metas(name="c", n=50):
    tensors = tuple(
        TensorMeta(name=f"t{i}", dtype="F32", shape=(64,), nbytes=256, buffer=0, offset=256 * i)
        for i in range(n)
    )
    rank = RankMetas(rank=0, device_key="k", host="h", buffer_bytes=(256 * n,), tensors=tensors)
    return CheckpointMetas(name=name, ranks=(rank,))


def test_the_same_metas_and_bucket_size_reuse_the_plan():
    config = PSConfig(bucket_bytes=4096, num_slots=2, device_memory_fraction=1.0)
    cache: dict = {}
    m = metas()
    first = choose_plan(m, config, 1 << 20, cache)
    assert choose_plan(m, config, 1 << 20, cache) is first
    assert choose_plan(metas(), config, 1 << 20, cache) is not first  # equal, not the same
    smaller = choose_plan(m, config, 4096, cache)  # 2 slots of 2048 bytes: smaller buckets
    assert smaller is not first and smaller.slot_bytes <= 2048
    assert choose_plan(m, config, 4096, cache) is smaller
    with pytest.raises(ValueError, match="not enough free memory"):
        choose_plan(m, config, 256, cache)  # 128 bytes a slot < the 256-byte tensors


def test_without_a_cache_every_call_plans():
    config = PSConfig(bucket_bytes=4096)
    m = metas()
    assert choose_plan(m, config, 1 << 30) == choose_plan(m, config, 1 << 30)
    assert choose_plan(m, config, 1 << 30) is not choose_plan(m, config, 1 << 30)
