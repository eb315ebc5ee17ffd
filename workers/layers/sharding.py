"""How one rank's parameter relates to checkpoint tensors: a declarative `ShardLayout`.

A parameter is the concatenation, along its tensor-parallel dim, of one or more *parts*; each part
is (this rank's chunk of) one checkpoint tensor. Unfused layers have one part (shard id None);
fused ones have several (`qkv_proj`: parts "q", "k", "v"; `gate_up_proj`: parts 0, 1). A part is
cut into `chunks` pieces along the dim; rank r holds piece `r * chunks // size`, so `chunks ==
size` splits evenly and `chunks < size` replicates each piece over `size // chunks` ranks (KV heads
when there are fewer KV heads than ranks). A piece longer than what remains of the tensor is zero
padded (vocabulary rows when the vocabulary does not divide by the TP size).

From this one record follow, with no per-layer code: the local shape, `load` (checkpoint tensor ->
this rank's slice, written in place), `unshard` (every rank's slice -> checkpoint tensors) and the
expected checkpoint shapes that `check_weights` validates against.

`StackedLayout` stacks `count` such layouts along a new leading dim: fused MoE experts, where
expert e's checkpoint tensors (e.g. `experts.e.gate_proj.weight`) are the parts of row e; its
shard ids are `(e, inner shard id)`. Every expert is split over TP the same way (the inner layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workers.errors import WeightCheckError

ShardId = str | int | tuple[int, "ShardId"] | None


@dataclass(frozen=True)
class Part:
    shard_id: ShardId
    full_shape: tuple[int, ...]
    chunks: int


@dataclass(frozen=True)
class ShardLayout:
    dim: int | None  # the tensor-parallel dim; None: the whole tensor on every rank
    parts: tuple[Part, ...]
    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a layout needs at least one part")
        if self.dim is None and (len(self.parts) != 1 or self.parts[0].chunks != 1):
            raise ValueError("a replicated layout has exactly one part of one chunk")
        for part in self.parts:
            if part.chunks < 1 or self.size % part.chunks:
                raise ValueError(
                    f"part {part.shard_id!r}: {part.chunks} chunks over {self.size} ranks"
                )
            if self.dim is not None:
                rest = _without(part.full_shape, self.dim)
                if rest != _without(self.parts[0].full_shape, self.dim):
                    raise ValueError(f"parts of one parameter differ off dim {self.dim}")

    @classmethod
    def replicated(cls, shape: tuple[int, ...]) -> ShardLayout:
        return cls(dim=None, parts=(Part(None, tuple(shape), 1),))

    def piece_len(self, part: Part) -> int:
        return -(-part.full_shape[self.dim] // part.chunks)  # ceil

    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.parts[0].full_shape
        shape = list(self.parts[0].full_shape)
        shape[self.dim] = sum(self.piece_len(p) for p in self.parts)
        return tuple(shape)

    def shard_ids(self) -> tuple[ShardId, ...]:
        return tuple(p.shard_id for p in self.parts)

    def full_shape(self, shard_id: ShardId) -> tuple[int, ...]:
        return self._find(shard_id)[0].full_shape

    def _find(self, shard_id: ShardId) -> tuple[Part, int]:
        offset = 0
        for part in self.parts:
            if part.shard_id == shard_id:
                return part, offset
            offset += self.piece_len(part) if self.dim is not None else 0
        raise KeyError(f"no part {shard_id!r} in this parameter (parts: {self.shard_ids()})")

    @torch.no_grad()
    def load(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        """Write this rank's slice of checkpoint tensor `loaded` into `param`, in place."""
        part, offset = self._find(shard_id)
        if tuple(loaded.shape) != part.full_shape:
            raise WeightCheckError(
                [f"shape {tuple(loaded.shape)} does not fit {part.full_shape} (part {shard_id!r})"]
            )
        if self.dim is None:
            param.data.copy_(loaded)
            return
        n = self.piece_len(part)
        start, length = self._rows(part)
        dst = param.data.narrow(self.dim, offset, n)
        if length:
            dst.narrow(self.dim, 0, length).copy_(loaded.narrow(self.dim, start, length))
        if length < n:
            dst.narrow(self.dim, length, n - length).zero_()

    def _rows(self, part: Part) -> tuple[int, int]:
        """(start, length) along `dim` of `part`'s checkpoint tensor that this rank keeps (the
        rest of its piece, past the tensor's end, is padding; a piece all padding keeps no rows,
        at the tensor's end)."""
        n, full = self.piece_len(part), part.full_shape[self.dim]
        start = min((self.rank * part.chunks // self.size) * n, full)
        return start, min(n, full - start)

    def kept(self, shard_id: ShardId = None) -> tuple[int, int, int] | None:
        """(dim, start, length): the only indices of checkpoint tensor `shard_id` that `load`
        reads; None when it reads all of it. What a worker reports, so that a sender may move
        it only those rows."""
        part, _ = self._find(shard_id)
        if self.dim is None:
            return None
        start, length = self._rows(part)
        if start == 0 and length == part.full_shape[self.dim]:
            return None
        return self.dim, start, length

    def unshard(self, shards: list[torch.Tensor]) -> dict[ShardId, torch.Tensor]:
        """Checkpoint tensors from every rank's parameter (`shards[r]` is rank r's data)."""
        if self.dim is None:
            return {self.parts[0].shard_id: shards[0]}
        if len(shards) != self.size:
            raise ValueError(f"need {self.size} shards, got {len(shards)}")
        out: dict[ShardId, torch.Tensor] = {}
        offset = 0
        for part in self.parts:
            n, step = self.piece_len(part), self.size // part.chunks
            pieces = [shards[c * step].narrow(self.dim, offset, n) for c in range(part.chunks)]
            full = torch.cat(pieces, dim=self.dim).narrow(self.dim, 0, part.full_shape[self.dim])
            out[part.shard_id] = full.contiguous()
            offset += n
        return out


@dataclass(frozen=True)
class StackedLayout:
    """`count` parameters of one `inner` layout stacked along dim 0 (row e: expert e). The
    tensor-parallel dim is the inner one, shifted by one; shard ids are `(row, inner shard id)`."""

    count: int
    inner: ShardLayout

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"a stacked layout needs at least one row, got {self.count}")

    @property
    def dim(self) -> int | None:
        return None if self.inner.dim is None else self.inner.dim + 1

    def local_shape(self) -> tuple[int, ...]:
        return (self.count, *self.inner.local_shape())

    def shard_ids(self) -> tuple[ShardId, ...]:
        inner = self.inner.shard_ids()
        return tuple((row, sid) for row in range(self.count) for sid in inner)

    def _split(self, shard_id: ShardId) -> tuple[int, ShardId]:
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2):
            raise KeyError(f"shard id {shard_id!r} is not (row, inner shard id)")
        row, sid = shard_id
        if not (isinstance(row, int) and 0 <= row < self.count):
            raise KeyError(f"row {row!r} out of range 0..{self.count - 1}")
        return row, sid

    def full_shape(self, shard_id: ShardId) -> tuple[int, ...]:
        return self.inner.full_shape(self._split(shard_id)[1])

    def kept(self, shard_id: ShardId = None) -> tuple[int, int, int] | None:
        """As `ShardLayout.kept`, of one expert's checkpoint tensor (dims of that tensor)."""
        return self.inner.kept(self._split(shard_id)[1])

    @torch.no_grad()
    def load(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        row, sid = self._split(shard_id)
        self.inner.load(param.data[row], loaded, sid)

    def unshard(self, shards: list[torch.Tensor]) -> dict[ShardId, torch.Tensor]:
        out: dict[ShardId, torch.Tensor] = {}
        for row in range(self.count):
            for sid, full in self.inner.unshard([s[row] for s in shards]).items():
                out[(row, sid)] = full
        return out


def _without(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    return shape[:dim] + shape[dim + 1 :]


def make_param(
    layout: ShardLayout | StackedLayout, *, dtype: torch.dtype | None = None
) -> nn.Parameter:
    """An uninitialised parameter of the layout's local shape (current default device; `dtype`,
    default the current default dtype), carrying `shard_layout` and the
    `weight_loader(param, tensor, shard_id)` that loaders call."""
    param = nn.Parameter(torch.empty(layout.local_shape(), dtype=dtype), requires_grad=False)
    param.shard_layout = layout
    param.weight_loader = layout.load
    return param
