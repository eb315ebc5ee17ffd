"""Safetensors files: header parsing and validation (pure), and parallel reads into host buffers.

File layout: an 8-byte little-endian header length N, N bytes of JSON header, then the data
section. The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section) plus an optional ``"__metadata__"`` object.

Every problem raises CheckpointFileError naming the file and the problem: truncated file, bad
header (length, encoding, JSON, field types), unknown dtype, offsets out of range, a tensor
whose offsets disagree with its dtype and shape, overlapping tensors, the same name twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import numpy as np

from ckpt_engine import dtypes, json_depth
from ckpt_engine.errors import CheckpointFileError

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024 * 1024


class TensorEntry(NamedTuple):
    """One tensor of a file; ``begin``/``end`` are byte offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    data_start: int  # file offset of the data section
    data_bytes: int  # bytes of the data section that tensors use (max end offset)
    tensors: tuple[TensorEntry, ...]  # sorted by begin offset


def header_length(path: str, prefix: bytes, file_size: int) -> int:
    """Validate the 8-byte length prefix against the file size; return the header length."""
    if file_size < 8 or len(prefix) < 8:
        raise CheckpointFileError(
            path, f"truncated: {file_size} bytes, shorter than the 8-byte header length"
        )
    (length,) = struct.unpack("<Q", prefix[:8])
    if length == 0:
        raise CheckpointFileError(path, "bad header: header length is 0")
    if length > MAX_HEADER_BYTES:
        raise CheckpointFileError(
            path, f"bad header: header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit"
        )
    if 8 + length > file_size:
        raise CheckpointFileError(
            path,
            f"truncated: header claims {length} bytes but only {file_size - 8} follow the prefix",
        )
    return length


class _DuplicateKeys:
    """object_pairs_hook recording duplicate keys per JSON object; the last object is the top."""

    def __init__(self) -> None:
        self.per_object: list[list[str]] = []

    def __call__(self, pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        duplicates = []
        for key, value in pairs:
            if key in out:
                duplicates.append(key)
            out[key] = value
        self.per_object.append(duplicates)
        return out

    def check(self, path: str) -> None:
        if not self.per_object:
            return
        top = self.per_object[-1]
        if top:
            raise CheckpointFileError(path, f"the same tensor name twice: {top[0]!r}")
        nested = [k for keys in self.per_object[:-1] for k in keys]
        if nested:
            raise CheckpointFileError(path, f"bad header: duplicate key {nested[0]!r}")


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: str, name: str, info: object, data_size: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise CheckpointFileError(path, f"bad header: entry of tensor {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise CheckpointFileError(path, f"bad header: tensor {name!r} has no dtype string")
    if not dtypes.is_supported(dtype):
        raise CheckpointFileError(
            path,
            f"unknown dtype {dtype!r} of tensor {name!r}; supported: {', '.join(dtypes.SUPPORTED)}",
        )
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CheckpointFileError(
            path, f"bad header: shape of tensor {name!r} is not a list of non-negative integers"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
        raise CheckpointFileError(
            path, f"bad header: data_offsets of tensor {name!r} is not [begin, end]"
        )
    begin, end = offsets
    if begin > end:
        raise CheckpointFileError(
            path, f"offsets out of range: tensor {name!r} begins at {begin} after its end {end}"
        )
    if end > data_size:
        raise CheckpointFileError(
            path,
            f"offsets out of range: tensor {name!r} ends at byte {end} of the data section, "
            f"which has only {data_size} bytes (truncated file?)",
        )
    need = dtypes.nbytes_of(dtype, shape)
    if end - begin != need:
        raise CheckpointFileError(
            path,
            f"offsets out of range: tensor {name!r} spans {end - begin} bytes but "
            f"{dtype}{list(shape)} needs {need}",
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


_ENTRY_KEYS = ('"dtype"', '"shape"', '"data_offsets"')


def _metadata_has_duplicates(text: str) -> bool | None:
    """Parse only the ``__metadata__`` object again, recording duplicate keys; None if it
    cannot be located unambiguously."""
    if text.count('"__metadata__"') != 1:
        return None
    i = text.index('"__metadata__"') + len('"__metadata__"')
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    if i >= len(text) or text[i] != ":":
        return None
    i += 1
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    duplicates = _DuplicateKeys()
    try:
        json.JSONDecoder(object_pairs_hook=duplicates).raw_decode(text, i)
    except json.JSONDecodeError:
        return None
    return any(duplicates.per_object)


def _fast_entries(text: str, obj: object, data_size: int) -> tuple[TensorEntry, ...] | None:
    """The entries of a well-formed header, checked with whole-column operations (a file of an
    MoE checkpoint holds thousands of tensors); None if anything is off, and the per-entry
    path below then names the problem. ``obj``: ``text`` parsed as plain JSON. A duplicate key
    (which plain parsing drops) shows as a count of entry keys in the text that differs from
    the entries parsed."""
    if not isinstance(obj, dict):
        return None
    items = [(k, v) for k, v in obj.items() if k != "__metadata__"]
    if len(items) != len(obj) and (
        not isinstance(obj["__metadata__"], dict) or _metadata_has_duplicates(text) is not False
    ):
        return None
    if any(text.count(key) != len(items) for key in _ENTRY_KEYS):
        return None
    fields = [v for _, v in items]
    if fields and (set(map(type, fields)) != {dict} or set(map(len, fields)) != {3}):
        return None
    try:
        kinds = [f["dtype"] for f in fields]
        shapes = [f["shape"] for f in fields]
        offsets = [f["data_offsets"] for f in fields]
    except KeyError:
        return None
    n = len(items)
    if n == 0:
        return ()
    if set(map(type, kinds)) != {str} or not set(kinds) <= set(dtypes.SUPPORTED):
        return None
    if set(map(type, shapes)) != {list} or set(map(type, offsets)) != {list}:
        return None
    dims = list(chain.from_iterable(shapes))
    if dims and (set(map(type, dims)) != {int} or min(dims) < 0):
        return None
    if set(map(len, offsets)) != {2}:
        return None
    flat = list(chain.from_iterable(offsets))
    if set(map(type, flat)) != {int} or min(flat) < 0:
        return None
    sizes = {d: dtypes.itemsize(d) for d in set(kinds)}
    need = np.fromiter((math.prod(sh) * sizes[d] for sh, d in zip(shapes, kinds)), np.int64, n)
    bounds = np.asarray(flat, dtype=np.int64).reshape(n, 2)
    begin, end = bounds[:, 0], bounds[:, 1]
    if (begin > end).any() or (end > data_size).any() or (end - begin != need).any():
        return None
    order = np.lexsort((end, begin))
    full = order[need[order] > 0]
    if full.size > 1 and (begin[full[1:]] < end[full[:-1]]).any():
        return None
    names = [k for k, _ in items]
    return tuple(
        TensorEntry(names[i], kinds[i], tuple(shapes[i]), offsets[i][0], offsets[i][1])
        for i in order.tolist()
    )


def parse_header(path: str, header: bytes, file_size: int) -> SafetensorsHeader:
    """Parse and validate the JSON header (``header`` excludes the 8-byte prefix). Pure."""
    data_start = 8 + len(header)
    data_size = file_size - data_start
    try:
        text = header.decode("utf-8")
        fast = _fast_entries(text, json_depth.loads(text, what="", max_depth=None), data_size)
    except (ValueError, TypeError):  # bad UTF-8, JSON or nesting included: named below
        fast = None
    if fast is not None:
        data_bytes = max((e.end for e in fast), default=0)
        return SafetensorsHeader(
            path=path, data_start=data_start, data_bytes=data_bytes, tensors=fast
        )
    try:
        text = header.decode("utf-8")
        duplicates = _DuplicateKeys()
        obj = json.loads(text, object_pairs_hook=duplicates)
    except UnicodeDecodeError as e:
        raise CheckpointFileError(path, f"bad header: not UTF-8 ({e})") from e
    except RecursionError:
        limit = json_depth.PARSER_LIMIT
        raise CheckpointFileError(path, f"bad header: JSON nested deeper than {limit}") from None
    except json.JSONDecodeError as e:
        raise CheckpointFileError(path, f"bad header: invalid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointFileError(path, "bad header: the header is not a JSON object")
    duplicates.check(path)
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointFileError(path, "bad header: __metadata__ is not an object")
    entries = sorted(
        (_entry(path, name, info, data_size) for name, info in obj.items()),
        key=lambda t: (t.begin, t.end),
    )
    previous: TensorEntry | None = None
    for entry in entries:
        if previous is not None and entry.nbytes and entry.begin < previous.end:
            raise CheckpointFileError(
                path, f"bad header: tensors {previous.name!r} and {entry.name!r} overlap"
            )
        if entry.nbytes:
            previous = entry
    data_bytes = max((e.end for e in entries), default=0)
    return SafetensorsHeader(
        path=path, data_start=data_start, data_bytes=data_bytes, tensors=tuple(entries)
    )


def _pread_exact(fd: int, path: str, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise CheckpointFileError(
                path, f"truncated: end of file at byte {offset + done} while reading"
            )
        done += n


def read_header(path: str) -> SafetensorsHeader:
    """Read and validate the header of one file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = bytearray(min(8, size))
            _pread_exact(f.fileno(), path, memoryview(prefix), 0)
            length = header_length(path, bytes(prefix), size)
            header = bytearray(length)
            _pread_exact(f.fileno(), path, memoryview(header), 8)
    except OSError as e:
        raise CheckpointFileError(path, f"cannot read: {e}") from e
    return parse_header(path, bytes(header), size)


@dataclass(frozen=True)
class ReadJob:
    """Copy ``len(dest)`` bytes of ``path`` starting at ``offset`` into ``dest``."""

    path: str
    offset: int
    dest: memoryview


def read_parallel(
    jobs: list[ReadJob], *, threads: int, on_read: Callable[[int], None] | None = None
) -> None:
    """Run read jobs on a thread pool, splitting large ones into chunks; first error wins.
    ``on_read(nbytes)`` runs after each chunk (progress; from the read threads)."""
    fds: dict[str, int] = {}
    try:
        for job in jobs:
            if job.path not in fds:
                try:
                    fds[job.path] = os.open(job.path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointFileError(job.path, f"cannot open: {e}") from e
        chunks = [
            (job.path, job.offset + start, job.dest[start : start + READ_CHUNK_BYTES])
            for job in jobs
            for start in range(0, len(job.dest), READ_CHUNK_BYTES)
        ]

        def work(chunk: tuple[str, int, memoryview]) -> None:
            path, offset, dest = chunk
            try:
                _pread_exact(fds[path], path, dest, offset)
            except OSError as e:
                raise CheckpointFileError(path, f"read failed at byte {offset}: {e}") from e
            if on_read is not None:
                on_read(dest.nbytes)

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for future in [pool.submit(work, c) for c in chunks]:
                future.result()
    finally:
        for fd in fds.values():
            os.close(fd)
