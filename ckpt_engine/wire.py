"""Typed, versioned messages between the parameter server (PS) and a worker; no pickle.

Each message is one ZMQ frame of UTF-8 JSON: ``{"v": 2, "type": <type>, ...fields}``. Decoding
checks the size cap, the version, the type (dispatch on it) and every field's type; anything
else raises ProtocolError. Bytes (CUDA IPC handles) travel as base64 strings.

Sequence of one update over a REQ (PS) / REP (worker) pair::

    PS  -> Plan{buffer handle, slots, manifest, layout}      worker -> Ack{of: plan, keeps} | Error
    PS  -> Bucket{id, slot}                                        -> Ack{of: bucket, id} | Error
    ...                                                                    (once per bucket)
    PS  -> Done      (worker checks it got every tensor, releases buffer)  -> Ack{of: done} | Error
    PS  -> Commit    (all ranks succeeded; worker runs post_hook)          -> Ack{of: commit} | Error
  or, at any point after a failure anywhere:
    PS  -> Abort{reason}                                                   -> Ack{of: abort}

Version 2 (many tensors, e.g. MoE checkpoints with 10^5 experts): everything per tensor travels
once, in the Plan, as columns (``Manifest``: names, dtypes, shapes; ``Layout``: how many
consecutive manifest tensors each bucket holds and each tensor's byte offset in its slot), so a
Bucket message is three fields whatever its tensor count, and each column is checked with a few
whole-list operations instead of a Python call per tensor. The PS encodes a plan's columns once
(``Manifest.json`` / ``Layout.json``) and reuses them for every update with that plan.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, fields
from functools import cached_property
from itertools import chain
from typing import Any, ClassVar, NamedTuple

from ckpt_engine import dtypes
from ckpt_engine.bulk import without_gc
from ckpt_engine.errors import ProtocolError

VERSION = 2
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024


# -- field readers ---------------------------------------------------------------------------
def _get(obj: dict, key: str, where: str) -> Any:
    if key not in obj:
        raise ProtocolError(f"{where}: missing field {key!r}")
    return obj[key]


def _str(obj: dict, key: str, where: str) -> str:
    value = _get(obj, key, where)
    if not isinstance(value, str):
        raise ProtocolError(f"{where}: field {key!r} must be a string")
    return value


def _int(obj: dict, key: str, where: str, *, optional: bool = False) -> int | None:
    value = _get(obj, key, where)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{where}: field {key!r} must be a non-negative integer")
    return value


def _float(obj: dict, key: str, where: str) -> float:
    value = _get(obj, key, where)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ProtocolError(f"{where}: field {key!r} must be a positive number")
    return float(value)


def _bool(obj: dict, key: str, where: str) -> bool:
    value = _get(obj, key, where)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}: field {key!r} must be a boolean")
    return value


def _b64(obj: dict, key: str, where: str) -> bytes:
    try:
        return base64.b64decode(_str(obj, key, where), validate=True)
    except ValueError as e:
        raise ProtocolError(f"{where}: field {key!r} is not base64") from e


def _list(obj: dict, key: str, where: str) -> list:
    value = _get(obj, key, where)
    if not isinstance(value, list):
        raise ProtocolError(f"{where}: field {key!r} must be a list")
    return value


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected an object")
    return value


# -- records inside messages -----------------------------------------------------------------
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


@dataclass(frozen=True)
class ShmBuffer:
    """CPU IPC buffer: a shared-memory file of ``nbytes`` bytes, owned (and unlinked) by the PS."""

    KIND: ClassVar[str] = "shm"
    path: str
    nbytes: int

    @classmethod
    def parse(cls, obj: dict, where: str) -> ShmBuffer:
        return cls(_str(obj, "path", where), _int(obj, "nbytes", where))


@dataclass(frozen=True)
class CudaBuffer:
    """GPU IPC buffer: the fields of ``UntypedStorage._share_cuda_()``, handles as bytes.

    The worker rebuilds it with ``UntypedStorage._new_shared_cuda`` on its own device index.
    """

    KIND: ClassVar[str] = "cuda"
    nbytes: int
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool

    @classmethod
    def parse(cls, obj: dict, where: str) -> CudaBuffer:
        return cls(
            nbytes=_int(obj, "nbytes", where),
            handle=_b64(obj, "handle", where),
            storage_size_bytes=_int(obj, "storage_size_bytes", where),
            storage_offset_bytes=_int(obj, "storage_offset_bytes", where),
            ref_counter_handle=_b64(obj, "ref_counter_handle", where),
            ref_counter_offset=_int(obj, "ref_counter_offset", where),
            event_handle=_b64(obj, "event_handle", where),
            event_sync_required=_bool(obj, "event_sync_required", where),
        )


_BUFFER_KINDS = {cls.KIND: cls for cls in (ShmBuffer, CudaBuffer)}


def _buffer(obj: dict, where: str) -> ShmBuffer | CudaBuffer:
    value = _dict(_get(obj, "buffer", where), f"{where}.buffer")
    kind = value.get("kind")
    if kind not in _BUFFER_KINDS:
        raise ProtocolError(f"{where}: unknown buffer kind {kind!r}")
    return _BUFFER_KINDS[kind].parse(value, f"{where}.buffer")


# -- messages --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    TYPE: ClassVar[str] = "plan"
    update_id: str
    rank: int
    device_key: str
    buffer: ShmBuffer | CudaBuffer
    num_slots: int
    slot_bytes: int
    num_buckets: int
    recv_timeout_s: float
    manifest: Manifest
    layout: Layout

    @classmethod
    def parse(cls, obj: dict, w: str) -> Plan:
        plan = cls(
            update_id=_str(obj, "update_id", w),
            rank=_int(obj, "rank", w),
            device_key=_str(obj, "device_key", w),
            buffer=_buffer(obj, w),
            num_slots=_int(obj, "num_slots", w),
            slot_bytes=_int(obj, "slot_bytes", w),
            num_buckets=_int(obj, "num_buckets", w),
            recv_timeout_s=_float(obj, "recv_timeout_s", w),
            manifest=_parsed(obj, "manifest", Manifest, w),
            layout=_parsed(obj, "layout", Layout, w),
        )
        layout, n = plan.layout, len(plan.manifest)
        if len(layout.counts) != plan.num_buckets or sum(layout.counts) != n:
            raise ProtocolError(
                f"{w}: the layout's {len(layout.counts)} buckets of {sum(layout.counts)} tensors "
                f"do not match {plan.num_buckets} buckets and {n} manifest tensors"
            )
        if len(layout.offsets) != n:
            raise ProtocolError(f"{w}: {len(layout.offsets)} offsets for {n} manifest tensors")
        return plan


def _parsed(obj: dict, key: str, cls: type, w: str) -> Any:
    value = _get(obj, key, w)
    # already parsed from a plan's columns frame (decode_frames); JSON never yields one
    return value if isinstance(value, cls) else cls.parse(value, f"{w}.{key}")


@dataclass(frozen=True)
class Bucket:
    """Bucket ``id`` is in ``slot``: its tensors are those the plan's layout gives it."""

    TYPE: ClassVar[str] = "bucket"
    update_id: str
    id: int
    slot: int

    @classmethod
    def parse(cls, obj: dict, w: str) -> Bucket:
        return cls(
            update_id=_str(obj, "update_id", w), id=_int(obj, "id", w), slot=_int(obj, "slot", w)
        )


@dataclass(frozen=True)
class Done:
    TYPE: ClassVar[str] = "done"
    update_id: str

    @classmethod
    def parse(cls, obj: dict, w: str) -> Done:
        return cls(update_id=_str(obj, "update_id", w))


@dataclass(frozen=True)
class Commit:
    """Every rank delivered every bucket and every worker released its buffer: run post_hook."""

    TYPE: ClassVar[str] = "commit"
    update_id: str

    @classmethod
    def parse(cls, obj: dict, w: str) -> Commit:
        return cls(update_id=_str(obj, "update_id", w))


@dataclass(frozen=True)
class Abort:
    TYPE: ClassVar[str] = "abort"
    update_id: str
    reason: str

    @classmethod
    def parse(cls, obj: dict, w: str) -> Abort:
        return cls(update_id=_str(obj, "update_id", w), reason=_str(obj, "reason", w))


ACK_OF = ("plan", "bucket", "done", "commit", "abort")


@dataclass(frozen=True)
class Ack:
    TYPE: ClassVar[str] = "ack"
    update_id: str
    of: str  # one of ACK_OF
    id: int | None = None  # the bucket id for ``of == "bucket"``
    keeps: Keeps | None = None  # ``of == "plan"``: the rows the worker reads, where not all

    @classmethod
    def parse(cls, obj: dict, w: str) -> Ack:
        of = _str(obj, "of", w)
        if of not in ACK_OF:
            raise ProtocolError(f"{w}: ack of unknown stage {of!r}")
        keeps = obj.get("keeps")
        return cls(
            update_id=_str(obj, "update_id", w),
            of=of,
            id=_int(obj, "id", w, optional=True),
            keeps=None if keeps is None else Keeps.parse(keeps, f"{w}.keeps"),
        )


@dataclass(frozen=True)
class Error:
    TYPE: ClassVar[str] = "error"
    update_id: str
    stage: str  # plan | bucket | done | commit | protocol
    bucket: int | None
    message: str
    traceback: str = ""

    @classmethod
    def parse(cls, obj: dict, w: str) -> Error:
        return cls(
            update_id=_str(obj, "update_id", w),
            stage=_str(obj, "stage", w),
            bucket=_int(obj, "bucket", w, optional=True),
            message=_str(obj, "message", w),
            traceback=_str(obj, "traceback", w),
        )


Message = Plan | Bucket | Done | Commit | Abort | Ack | Error
MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls for cls in (Plan, Bucket, Done, Commit, Abort, Ack, Error)
}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (ShmBuffer, CudaBuffer)):
        return {
            "kind": value.KIND,
            **{f.name: _plain(getattr(value, f.name)) for f in fields(value)},
        }
    if isinstance(value, (tuple, list)):
        if value and type(value[0]) in (str, int):  # a column (its type is checked on decode)
            return list(value)
        return [_plain(v) for v in value]
    return value


def encode(msg: Message, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """One frame of JSON; ProtocolError if it exceeds ``max_bytes``."""
    body = {"v": VERSION, "type": msg.TYPE}
    columns = []  # records of columns: their JSON is cached, spliced in
    for f in fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, _Columns):
            columns.append(f'"{f.name}":{value.json}')
        else:
            body[f.name] = _plain(value)
    text = json.dumps(body, separators=(",", ":"))
    if columns:
        text = text[:-1] + "," + ",".join(columns) + "}"
    data = text.encode("utf-8")
    if len(data) > max_bytes:
        raise ProtocolError(f"{msg.TYPE} message of {len(data)} bytes exceeds the cap {max_bytes}")
    return data


def _header(obj: Any) -> type:
    """The message class a decoded JSON object announces (after the version check)."""
    obj = _dict(obj, "message")
    version = obj.get("v")
    if version != VERSION:
        raise ProtocolError(
            f"wire version {version!r} is not supported (this side speaks {VERSION})"
        )
    kind = obj.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}; known: {', '.join(MESSAGE_TYPES)}")
    return cls


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"{what} is not JSON: {e}") from e


@without_gc
def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one frame; ProtocolError names what is wrong."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the cap {max_bytes}")
    obj = _json(data, "message")
    return _header(obj).parse(obj, obj["type"])


# -- plans in two frames ---------------------------------------------------------------------
# A Plan travels as [header, columns]: the columns frame ({"manifest", "layout"}) is byte for
# byte the same for every update with the same plan, so the receiver compares it with the last
# one it parsed (a memcmp) and reuses those (immutable) records instead of parsing 10^5 entries
# again. One entry each side, replaced atomically.
COLUMNS_FRAME = "next-frame"
_sent: tuple[Manifest, Layout, bytes] | None = None
_received: tuple[bytes, Manifest, Layout] | None = None


def _columns_frame(manifest: Manifest, layout: Layout) -> bytes:
    global _sent
    last = _sent
    if last is not None and last[0] is manifest and last[1] is layout:
        return last[2]
    data = f'{{"manifest":{manifest.json},"layout":{layout.json}}}'.encode()
    _sent = (manifest, layout, data)
    return data


def _parse_columns(data: bytes) -> tuple[Manifest, Layout]:
    global _received
    last = _received
    if last is not None and last[0] == data:
        return last[1], last[2]
    obj = _dict(_json(data, "plan columns frame"), "plan columns")
    parsed = (
        Manifest.parse(_get(obj, "manifest", "plan"), "plan.manifest"),
        Layout.parse(_get(obj, "layout", "plan"), "plan.layout"),
    )
    _received = (data, *parsed)
    return parsed


def encode_frames(msg: Message, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[bytes]:
    """The frames of one message: ``[header, columns]`` for a Plan, ``[encode(msg)]`` else."""
    if not isinstance(msg, Plan):
        return [encode(msg, max_bytes=max_bytes)]
    body: dict[str, Any] = {"v": VERSION, "type": msg.TYPE, "columns": COLUMNS_FRAME}
    body.update(
        {
            f.name: _plain(getattr(msg, f.name))
            for f in fields(msg)
            if f.name not in ("manifest", "layout")
        }
    )
    frames = [
        json.dumps(body, separators=(",", ":")).encode("utf-8"),
        _columns_frame(msg.manifest, msg.layout),
    ]
    size = sum(map(len, frames))
    if size > max_bytes:
        raise ProtocolError(f"plan message of {size} bytes exceeds the cap {max_bytes}")
    return frames


@without_gc
def decode_frames(frames: list[bytes], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate the frames of one message (``encode_frames``)."""
    if len(frames) == 1:
        return decode(frames[0], max_bytes=max_bytes)
    size = sum(map(len, frames))
    if size > max_bytes:
        raise ProtocolError(f"message of {size} bytes exceeds the cap {max_bytes}")
    obj = _json(frames[0], "message")
    cls = _header(obj)
    if len(frames) != 2 or cls is not Plan or obj.get("columns") != COLUMNS_FRAME:
        raise ProtocolError(f"a {obj.get('type')} message of {len(frames)} frames")
    obj["manifest"], obj["layout"] = _parse_columns(frames[1])
    return Plan.parse(obj, "plan")
