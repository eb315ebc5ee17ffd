"""SourceMap (pure): which bytes of a buffer range come from which source, merged copies."""

import pytest

from ckpt_engine.ps.sources import HOST, Piece, SourceMap, Span, from_host

# buffer 0: a host-held tensor, then two direct tensors back to back in storage 0 (a trainer's
# flat buffer: 512 bytes apart there and in the host buffer), then one of storage 1, then a
# host-held one; buffer 1: host-held only.
SPANS = [
    Span(0, 0, 100, HOST, 0, 0),
    Span(0, 256, 512, 0, 1024, 1),
    Span(0, 768, 256, 0, 1536, 2),
    Span(0, 1024, 10, 1, 0, 3),
    Span(0, 1280, 20, HOST, 0, 4),
    Span(1, 0, 64, HOST, 0, 5),
]


@pytest.mark.parametrize(
    ("buffer", "start", "nbytes", "dst", "want"),
    [
        # the whole buffer 0 as one run into a slot at 4096: padding is skipped where the
        # source changes, the flat storage's two tensors are one copy
        (
            0,
            0,
            1300,
            4096,
            [
                Piece(HOST, 0, 4096, 100),
                Piece(0, 1024, 4096 + 256, 768),
                Piece(1, 0, 4096 + 1024, 10),
                Piece(HOST, 1280, 4096 + 1280, 20),
            ],
        ),
        # a run starting inside a tensor and ending inside another
        (0, 300, 600, 0, [Piece(0, 1024 + 44, 0, 600)]),
        # only padding: nothing to copy
        (0, 100, 156, 0, []),
        (0, 1034, 246, 0, []),
        # past the last span
        (0, 1300, 100, 0, []),
        # a buffer with no direct tensor: its tensors from the host buffer, padding included
        (1, 0, 64, 8, [Piece(HOST, 0, 8, 64)]),
        # a buffer the map does not know
        (7, 0, 64, 0, []),
    ],
)
def test_pieces(buffer, start, nbytes, dst, want):
    assert SourceMap(SPANS).pieces(buffer, start, nbytes, dst) == want


def test_merges_only_where_both_sides_continue_alike():
    # storage gap 0 but host gap 156 (the host packing aligns): two copies
    spans = [Span(0, 0, 100, 0, 0), Span(0, 256, 100, 0, 100)]
    assert SourceMap(spans).pieces(0, 0, 356, 0) == [Piece(0, 0, 0, 100), Piece(0, 100, 256, 100)]
    # the same gap on both sides: one copy, the gap read from the same storage
    spans = [Span(0, 0, 100, 0, 0), Span(0, 256, 100, 0, 256)]
    assert SourceMap(spans).pieces(0, 0, 356, 0) == [Piece(0, 0, 0, 356)]
    # two storages: never merged, even where the offsets would continue
    spans = [Span(0, 0, 256, 0, 0), Span(0, 256, 256, 1, 256)]
    assert len(SourceMap(spans).pieces(0, 0, 512, 0)) == 2
    # a host-held tensor between two direct ones of one storage: three copies, in order
    spans = [Span(0, 0, 256, 0, 0), Span(0, 256, 256, HOST), Span(0, 512, 256, 0, 512)]
    assert [p.storage for p in SourceMap(spans).pieces(0, 0, 768, 0)] == [0, HOST, 0]
    # host-held tensors merge across padding (the host buffer's runs keep their layout)
    spans = [Span(0, 0, 100, HOST), Span(0, 256, 100, HOST)]
    assert SourceMap(spans).pieces(0, 0, 356, 32) == [Piece(HOST, 0, 32, 356)]


def test_host_copies_are_the_direct_pieces_at_their_buffer_offsets():
    smap = SourceMap(SPANS)
    assert smap.host_copies(0, 1300) == [Piece(0, 1024, 256, 768), Piece(1, 0, 1024, 10)]
    assert smap.host_copies(1, 64) == []


def test_covers_buffers_storages_and_tensor_at():
    smap = SourceMap([*SPANS, Span(2, 0, 0, 0, 0)])  # an empty span is dropped
    assert smap.covers(0) and not smap.covers(1) and not smap.covers(2)
    assert smap.buffers() == [0]
    assert smap.storages == [0, 1]
    assert [smap.tensor_at(0, o) for o in (0, 99, 100, 256, 800, 1029, 1034, 1299)] == [
        0,
        0,
        -1,
        1,
        2,
        3,
        -1,
        4,
    ]
    assert smap.tensor_at(9, 0) == -1


def test_spans_are_sorted_and_overlaps_refused():
    smap = SourceMap([Span(0, 256, 10, 0, 256), Span(0, 0, 10, 0, 0)])
    assert smap.pieces(0, 0, 266, 0) == [Piece(0, 0, 0, 266)]
    with pytest.raises(ValueError, match="overlap"):
        SourceMap([Span(0, 0, 100), Span(0, 50, 100)])


KiB = 1 << 10


@pytest.mark.parametrize(
    ("direct", "host", "want"),
    [
        ([4 * KiB] * 16, 0, True),  # many small tensors (MoE experts): from the host copy
        ([4 * KiB] * 15, 0, False),  # not many
        ([4 * KiB] * 15, 100, False),  # host-held pieces do not count
        ([600 * KiB] * 16, 0, False),  # not small on average
        ([4 * KiB] * 15 + [8 << 20], 0, False),  # one large tensor among them
        ([512 * KiB - 1] * 16, 0, True),
        ([], 3, False),
    ],
)
def test_from_host(direct, host, want):
    pieces = [Piece(0, 0, 0, n) for n in direct] + [Piece(HOST, 0, 0, 1)] * host
    assert from_host(pieces) is want
