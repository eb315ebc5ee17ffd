"""Records that travel as columns inside wire messages (ckpt_engine.wire): the manifest of an
update, the layout of its buckets, the rows a worker keeps. Their JSON is made once per record,
and each column is checked with whole-list operations, not a call per tensor."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cached_property
from itertools import chain
from typing import Any, NamedTuple

from ckpt_engine import dtypes
from ckpt_engine.bulk import without_gc
from ckpt_engine.errors import ProtocolError
from ckpt_engine.wire.readers import _dict, _list


class TensorSpec(NamedTuple):
    """A manifest entry: a tensor the update will deliver (what ``validate`` receives)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def _column(obj: dict, key: str, where: str, kind: type) -> list:
    """A list whose every element is exactly of type ``kind`` (bool is no int here)."""
    value = _list(obj, key, where)
    if value and set(map(type, value)) != {kind}:
        raise ProtocolError(f"{where}: every element of {key!r} must be a {kind.__name__}")
    return value


def _uint_column(obj: dict, key: str, where: str) -> tuple[int, ...]:
    value = _column(obj, key, where, int)
    if value and min(value) < 0:
        raise ProtocolError(f"{where}: {key!r} holds a negative number")
    return tuple(value)


class _Columns:
    """A record of columns whose JSON is computed once (a plan's manifest is sent per update)."""

    @cached_property
    @without_gc
    def json(self) -> str:
        # the columns hold only str, int and tuples of them, which json writes as lists
        return json.dumps(
            {f.name: getattr(self, f.name) for f in fields(self)}, separators=(",", ":")
        )


@dataclass(frozen=True, eq=True)
class Manifest(_Columns):
    """Every tensor an update delivers, as columns: tensor i is ``names[i]``, ``dtypes[i]``
    (safetensors spelling), ``shapes[i]``; in delivery order."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def of(cls, specs) -> Manifest:
        """From (name, dtype, shape) records, e.g. TensorSpecs."""
        specs = list(specs)
        return cls(
            tuple(s[0] for s in specs), tuple(s[1] for s in specs), tuple(s[2] for s in specs)
        )

    @cached_property
    @without_gc
    def _specs(self) -> tuple[TensorSpec, ...]:
        return tuple(map(TensorSpec._make, zip(self.names, self.dtypes, self.shapes)))

    def specs(self) -> list[TensorSpec]:
        """The manifest as records (a new list; the records are made once per manifest)."""
        return list(self._specs)

    @classmethod
    def parse(cls, obj: Any, where: str) -> Manifest:
        obj = _dict(obj, where)
        names = _column(obj, "names", where, str)
        kinds = _column(obj, "dtypes", where, str)
        shapes = _column(obj, "shapes", where, list)
        if not len(names) == len(kinds) == len(shapes):
            raise ProtocolError(f"{where}: names, dtypes and shapes differ in length")
        unknown = set(kinds).difference(dtypes.SUPPORTED)
        if unknown:
            raise ProtocolError(f"{where}: unknown dtype {sorted(unknown)[0]!r}")
        dims = list(chain.from_iterable(shapes))
        if dims and (set(map(type, dims)) != {int} or min(dims) < 0):
            raise ProtocolError(f"{where}: shape must be a list of non-negative integers")
        return cls(tuple(names), tuple(kinds), tuple(map(tuple, shapes)))


@dataclass(frozen=True, eq=True)
class Layout(_Columns):
    """Where the manifest's tensors land: bucket b holds the next ``counts[b]`` tensors of the
    manifest (bucket 0 the first ones), tensor i ``offsets[i]`` bytes from its slot's start."""

    counts: tuple[int, ...]
    offsets: tuple[int, ...]

    @classmethod
    def parse(cls, obj: Any, where: str) -> Layout:
        obj = _dict(obj, where)
        return cls(_uint_column(obj, "counts", where), _uint_column(obj, "offsets", where))


@dataclass(frozen=True, eq=True)
class Keeps(_Columns):
    """What a worker reads of the manifest's tensors where it reads only part (a tensor-parallel
    rank keeps its rows): tensor ``indices[i]`` (manifest index) only along dim ``dims[i]``,
    indices ``starts[i]`` to ``starts[i] + lengths[i]``; every other tensor whole. Sent with
    the Ack of the plan, so a sender may move only those rows (P2P: each receiver reads only
    them)."""

    indices: tuple[int, ...]
    dims: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.indices)

    @classmethod
    def parse(cls, obj: Any, where: str) -> Keeps:
        obj = _dict(obj, where)
        cols = [_uint_column(obj, k, where) for k in ("indices", "dims", "starts", "lengths")]
        if len({len(c) for c in cols}) > 1:
            raise ProtocolError(f"{where}: indices, dims, starts and lengths differ in length")
        return cls(*cols)
