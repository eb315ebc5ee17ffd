"""A P2P receiver's reads when its worker keeps only some rows (pure): row shards are one range
each, at the slot offset the whole tensor would have; column shards one strided range;
unlisted tensors are read whole; adjacent ranges merge; the worker's Keeps travel with the Ack; the
reference layouts report exactly the rows their `load` reads."""

from __future__ import annotations

import pytest
import torch

from ckpt_engine import wire
from ckpt_engine.errors import ProtocolError
from ckpt_engine.metas import CheckpointMetas, RankMetas, TensorMeta
from ckpt_engine.p2p.shards import Kept, kept_by_name, kept_range, shard_copies
from ckpt_engine.planner import CopyRange, plan_buckets
from ckpt_engine.worker import _keeps


@pytest.mark.parametrize(
    "shape, kept, want",
    [
        ((8, 4), Kept(0, 4, 4), (64, 128)),  # rows 4..7 of a [8, 4] float32: one range
        ((8, 4), Kept(0, 0, 8), (0, 128)),
        ((1, 8, 4), Kept(1, 2, 2), (32, 64)),  # a leading dim of 1: still contiguous
        ((8, 4), Kept(1, 0, 2), None),  # columns: strided, read whole
        ((3, 8, 4), Kept(1, 0, 4), None),
    ],
)
def test_kept_range(shape, kept, want):
    assert kept_range(shape, 4, kept) == want


def test_kept_range_refuses_rows_outside_the_tensor():
    with pytest.raises(ProtocolError, match="rows 6\\+4 along dim 0"):
        kept_range((8, 4), 4, Kept(0, 6, 4))
    with pytest.raises(ProtocolError, match="along dim 2"):
        kept_range((8, 4), 4, Kept(2, 0, 1))


def test_a_worker_reporting_rows_outside_a_tensor_is_refused_naming_it():
    """The rows come from the worker's Ack: the error names the tensor, not just a shape."""
    bucket, _ = _bucket()
    with pytest.raises(ProtocolError, match=r"'a.o'.*rows 6\+4 along dim 1"):
        shard_copies(bucket, {"a.q": Kept(0, 0, 4), "a.o": Kept(1, 6, 4)})


def _bucket():
    """One owner, tensors back to back in one buffer: one copy run for the whole bucket."""
    shapes = {"a.q": (8, 4), "a.o": (4, 8), "norm": (4,), "b.q": (8, 4)}
    tensors, offset = [], 0
    for name, shape in shapes.items():
        n = 4 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        tensors.append(TensorMeta(name, "F32", shape, n, 0, offset))
        offset += n
    metas = CheckpointMetas(
        name="c",
        ranks=(
            RankMetas(
                rank=0,
                device_key="CPU-h-0",
                host="h",
                buffer_bytes=(offset,),
                tensors=tuple(tensors),
            ),
        ),
    )
    plan = plan_buckets(metas, bucket_bytes=1 << 20)
    assert len(plan.buckets) == 1 and len(plan.buckets[0].copies) == 1
    return plan.buckets[0], {i.name: i.offset for i in plan.buckets[0].items}


def test_shard_copies_cut_each_tensor_to_its_rows_at_its_slot_offset():
    bucket, at = _bucket()
    run = bucket.copies[0]
    kept = {"a.q": Kept(0, 4, 4), "a.o": Kept(1, 0, 4), "b.q": Kept(0, 0, 4)}
    copies = shard_copies(bucket, kept)
    src = {name: run.src + (off - run.dst) for name, off in at.items()}
    # rows 4..7 of a.q; columns 0..3 of a.o: 4 runs of 16 bytes, 32 apart; norm whole (not
    # listed); rows 0..3 of b.q
    assert copies == (
        CopyRange(0, src["a.q"] + 64, at["a.q"] + 64, 64),
        CopyRange(0, src["a.o"], at["a.o"], 16, count=4, stride=32),
        CopyRange(0, src["norm"], at["norm"], 16 + 64),  # norm and b.q: back to back, one read
    )
    gap = shard_copies(bucket, {"a.q": Kept(0, 0, 4), "b.q": Kept(0, 4, 4)})
    assert gap == (
        CopyRange(0, src["a.q"], at["a.q"], 64),  # rows 0..3 of a.q
        CopyRange(0, src["a.o"], at["a.o"], 128 + 16),  # a.o, norm: whole, one read
        CopyRange(0, src["b.q"] + 64, at["b.q"] + 64, 64),  # rows 4..7 of b.q
    )
    assert sum(c.total for c in copies) == 64 + 64 + 16 + 64  # of 128 + 128 + 16 + 128
    assert shard_copies(bucket, {}) == bucket.copies  # nothing kept: the plan's reads


def test_shard_copies_then_the_workers_view_holds_its_rows():
    """Execute the reads into a slot: the kept rows are exactly the owner's."""
    bucket, at = _bucket()
    owner = torch.arange(bucket.copies[0].nbytes // 4, dtype=torch.float32)
    host = owner.view(torch.uint8)
    slot = torch.full((bucket.nbytes,), 0xFF, dtype=torch.uint8)
    for c in shard_copies(bucket, {"a.q": Kept(0, 4, 4), "a.o": Kept(1, 4, 4)}):
        for i in range(c.count):
            a, b = c.src + i * c.stride, c.dst + i * c.stride
            slot[b : b + c.nbytes] = host[a : a + c.nbytes]
    view = slot[at["a.q"] : at["a.q"] + 128].view(torch.float32).view(8, 4)
    assert torch.equal(view[4:], owner[16:32].view(4, 4))
    assert torch.isnan(view[:4]).all()  # never written: the worker does not read it
    o = slot[at["a.o"] : at["a.o"] + 128].view(torch.float32).view(4, 8)
    assert torch.equal(o[:, 4:], owner[32:64].view(4, 8)[:, 4:])  # columns 4..7 of a.o
    assert torch.isnan(o[:, :4]).all()


def test_a_tensor_kept_not_at_all_is_not_read():
    """Zero rows (an expert on another expert-parallel rank), along dim 0 or 1: no read of it;
    the worker's Ack of zero rows is accepted."""
    bucket, at = _bucket()
    src = {name: bucket.copies[0].src + (off - bucket.copies[0].dst) for name, off in at.items()}
    copies = shard_copies(
        bucket, {"a.q": Kept(0, 0, 0), "a.o": Kept(1, 0, 0), "b.q": Kept(0, 0, 0)}
    )
    assert copies == (CopyRange(0, src["norm"], at["norm"], 16),)  # the norm alone
    manifest = wire.Manifest(("w", "d"), ("F32", "F32"), ((8, 4), (4, 8)))
    assert _keeps(manifest, {"w": (0, 0, 0), "d": (1, 0, 0)}) == wire.Keeps(
        (0, 1), (0, 1), (0, 0), (0, 0)
    )


def test_keeps_travel_with_the_ack_and_map_back_to_names():
    manifest = wire.Manifest(("w", "n"), ("F32", "F32"), ((8, 4), (4,)))
    keeps = _keeps(manifest, {"w": (0, 4, 4)})
    assert keeps == wire.Keeps((0,), (0,), (4,), (4,))
    ack = wire.Ack(update_id="u", of="plan", keeps=keeps)
    assert wire.decode(wire.encode(ack)) == ack
    assert kept_by_name(manifest.names, keeps) == {"w": Kept(0, 4, 4)}
    assert wire.decode(wire.encode(wire.Ack(update_id="u", of="plan"))).keeps is None
    with pytest.raises(ProtocolError, match="not in the update"):
        _keeps(manifest, {"x": (0, 0, 1)})
    with pytest.raises(ProtocolError, match="rows 4\\+8"):
        _keeps(manifest, {"w": (0, 4, 8)})
    with pytest.raises(ProtocolError, match="tensor 5 of a manifest of 2"):
        kept_by_name(manifest.names, wire.Keeps((5,), (0,), (0,), (1,)))
    bad = b'{"v":2,"type":"ack","update_id":"u","of":"plan","keeps":{"indices":[0],"dims":[]}}'
    with pytest.raises(ProtocolError):
        wire.decode(bad)


def test_reference_layouts_report_what_load_reads():
    """`ShardLayout.kept` is the row range `load` copies (a fused part, a padded vocabulary,
    replicated KV heads, a replicated tensor: None), so a receiver that read only those rows
    loads the same parameter."""
    from workers.layers.sharding import Part, ShardLayout, StackedLayout, make_param

    cases = [
        ShardLayout(0, (Part("q", (8, 6), 2), Part("k", (4, 6), 1), Part("v", (4, 6), 1)), 1, 2),
        ShardLayout(0, (Part(None, (7, 4), 2),), 1, 2),  # padded vocabulary: the last row
        ShardLayout(1, (Part(None, (6, 8), 4),), 2, 4),
        ShardLayout.replicated((5,)),
    ]
    torch.manual_seed(0)
    for layout in [*cases, StackedLayout(2, cases[2])]:
        for sid in layout.shard_ids():
            full = torch.randn(layout.full_shape(sid))
            want, got = make_param(layout), make_param(layout)
            want.data.zero_(), got.data.zero_()
            layout.load(want, full, sid)
            partial = torch.full_like(full, float("nan"))
            kept = layout.kept(sid)
            if kept is None:
                partial = full
            else:
                dim, start, length = kept
                partial.narrow(dim, start, length).copy_(full.narrow(dim, start, length))
            layout.load(got, partial, sid)
            assert torch.equal(got.data, want.data), (layout, sid)
    assert cases[0].kept("k") is None  # one KV piece replicated over both ranks: all of it
    assert cases[1].kept(None) == (0, 4, 3)


@pytest.mark.parametrize("rows, size", [(5, 4), (13, 8), (9, 4), (7, 2)])
def test_a_rank_of_padding_only_keeps_no_rows_inside_the_tensor(rows, size):
    """A rank whose piece starts past the tensor's end (all padding: 5 rows over 4 ranks by 2,
    rank 3 starts at row 6) keeps no rows, reported inside the tensor, so the worker's Ack of the
    plan is accepted (it refused the whole update: rows 6+0 of a tensor of 5) and loading only
    those rows still gives the same parameter."""
    from workers.layers.sharding import Part, ShardLayout, make_param

    full = torch.randn(rows, 3)
    manifest = wire.Manifest(("w",), ("F32",), ((rows, 3),))
    for rank in range(size):
        layout = ShardLayout(0, (Part(None, (rows, 3), size),), rank, size)
        kept = layout.kept()
        if kept is None:
            continue
        dim, start, length = kept
        assert start >= 0 and start + length <= rows, (rank, kept)
        assert len(_keeps(manifest, {"w": kept})) == 1
        want, got = make_param(layout), make_param(layout)
        layout.load(want, full)
        partial = torch.full_like(full, float("nan"))
        partial.narrow(dim, start, length).copy_(full.narrow(dim, start, length))
        layout.load(got, partial)
        assert torch.equal(got.data, want.data), rank
