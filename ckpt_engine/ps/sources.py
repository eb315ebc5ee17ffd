"""Which bytes of a host buffer's range come from which source (pure): the map behind
``register_and_update``'s direct fill (ckpt_engine.ps.direct).

Named tensors are packed into host buffers (ckpt_engine.ps.named.pack). Some of them are
"direct": still readable in their own memory on the rank's device while the update runs, so
the mover copies them into the slot straight from there, not from the host copy. A
``SourceMap`` records, per host buffer, each named tensor's span ``[offset, offset + nbytes)``
and where its bytes live: ``storage`` -1 for the host buffer itself (the tensor's host copy is
complete at registration), else the index of a source storage and ``soffset``, the tensor's byte
offset in it. ``pieces`` cuts a range of a buffer (a plan's copy run, or a whole buffer) into
the copies to make: only the tensors' bytes (padding between tensors is not copied unless a
piece spans it, below), in order, each piece from one source.

A run of many small direct pieces (experts of a large MoE model: 10^5 tensors) is instead
copied in one piece from the host buffer once the host copy of that buffer has landed
(``from_host``): one copy call instead of thousands, behind a copy that bounds the step anyway.

Consecutive pieces of one source merge into one copy when the bytes between them are as far
apart on both sides (the host buffer's runs always are; tensors that are views of one flat
storage often are), so a trainer's flat buffer costs one copy per run, not one per tensor. The
bytes between two merged pieces are padding of the destination and bytes of the same storage
on the source side, so a merged copy reads only memory of that storage and writes only the
range asked for.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple

HOST = -1  # the storage of a span whose bytes are read from the host buffer
# A run of at least MANY_PIECES direct pieces of fewer than SMALL_PIECE_BYTES each on average
# is copied from the host copy once that has landed (``from_host``): a copy call costs the
# host about 10 us, what the host-to-device link moves 512 KiB in.
MANY_PIECES = 16
SMALL_PIECE_BYTES = 512 << 10


class Span(NamedTuple):
    """A named tensor (``tensor``: its index, for error messages) in host buffer ``buffer`` at
    ``offset``; its bytes are in ``storage`` (HOST: the buffer) at ``soffset``."""

    buffer: int
    offset: int
    nbytes: int
    storage: int = HOST
    soffset: int = 0
    tensor: int = -1


class Piece(NamedTuple):
    """Copy ``nbytes`` bytes from ``src`` in ``storage`` (HOST: the host buffer's offset) to
    ``dst``."""

    storage: int
    src: int
    dst: int
    nbytes: int


class SourceMap:
    """Spans by buffer (each buffer's spans sorted by offset, not overlapping)."""

    def __init__(self, spans: list[Span]) -> None:
        self._spans: dict[int, list[Span]] = {}
        for span in spans:
            if span.nbytes > 0:
                self._spans.setdefault(span.buffer, []).append(span)
        self._starts: dict[int, list[int]] = {}
        for buffer, items in self._spans.items():
            items.sort(key=lambda s: s.offset)
            for a, b in pairwise(items):
                if a.offset + a.nbytes > b.offset:
                    raise ValueError(f"buffer {buffer}: spans at {a.offset} and {b.offset} overlap")
            self._starts[buffer] = [s.offset for s in items]
        self.storages = sorted({s.storage for v in self._spans.values() for s in v} - {HOST})

    def covers(self, buffer: int) -> bool:
        """Whether any direct span lies in ``buffer`` (else its ranges copy from the host)."""
        return any(s.storage != HOST for s in self._spans.get(buffer, ()))

    def buffers(self) -> list[int]:
        """The buffers with a direct span, in order."""
        return sorted(b for b in self._spans if self.covers(b))

    def pieces(self, buffer: int, start: int, nbytes: int, dst: int) -> list[Piece]:
        """The copies that fill ``[dst, dst + nbytes)`` with the tensors' bytes of buffer range
        ``[start, start + nbytes)``, merged where they continue (module docstring)."""
        items = self._spans.get(buffer, [])
        end = start + nbytes
        i = max(0, bisect_right(self._starts.get(buffer, []), start) - 1)
        out: list[Piece] = []
        for span in items[i:]:
            if span.offset >= end:
                break
            a, b = max(span.offset, start), min(span.offset + span.nbytes, end)
            if b <= a:
                continue
            src = a if span.storage == HOST else span.soffset + (a - span.offset)
            piece = Piece(span.storage, src, dst + (a - start), b - a)
            if out:
                last = out[-1]
                gap = piece.dst - (last.dst + last.nbytes)
                if last.storage == piece.storage and piece.src - (last.src + last.nbytes) == gap:
                    out[-1] = last._replace(nbytes=piece.dst + piece.nbytes - last.dst)
                    continue
            out.append(piece)
        return out

    def tensor_at(self, buffer: int, offset: int) -> int:
        """The ``tensor`` of the span holding byte ``offset`` of ``buffer`` (-1: none)."""
        i = bisect_right(self._starts.get(buffer, []), offset) - 1
        if i >= 0:
            span = self._spans[buffer][i]
            if offset < span.offset + span.nbytes:
                return span.tensor
        return -1

    def host_copies(self, buffer: int, nbytes: int) -> list[Piece]:
        """The direct pieces of a whole buffer of ``nbytes``: what fills its host copy."""
        return [p for p in self.pieces(buffer, 0, nbytes, 0) if p.storage != HOST]


def from_host(pieces: Sequence[Piece]) -> bool:
    """Whether a run is better copied whole from its host copy (once landed) than piece by
    piece from the sources: at least MANY_PIECES direct pieces, SMALL_PIECE_BYTES or less
    on average."""
    direct = [p.nbytes for p in pieces if p.storage != HOST]
    return len(direct) >= MANY_PIECES and sum(direct) < SMALL_PIECE_BYTES * len(direct)
