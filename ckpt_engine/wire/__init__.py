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
from typing import Any, ClassVar

from ckpt_engine import json_depth
from ckpt_engine.bulk import without_gc
from ckpt_engine.errors import ProtocolError
from ckpt_engine.wire.columns import Keeps, Layout, Manifest, TensorSpec, _Columns
from ckpt_engine.wire.readers import _b64, _bool, _dict, _float, _get, _int, _str

__all__ = ["Keeps", "Layout", "Manifest", "TensorSpec"]

VERSION = 2
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024


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
    if not isinstance(kind, str) or kind not in _BUFFER_KINDS:
        raise ProtocolError(f"{where}: unknown buffer kind {json_depth.describe(kind)}")
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
            f"wire version {json_depth.describe(version)} is not supported (this side speaks {VERSION})"
        )
    kind = obj.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(
            f"unknown message type {json_depth.describe(kind)}; known: {', '.join(MESSAGE_TYPES)}"
        )
    return cls


def _json(data: bytes, what: str) -> Any:
    """Parsed; nesting bounded only by the parser (json_depth): every reader takes its field
    at its declared shape, so deeper data is refused there as a wrong type."""
    try:
        return json_depth.loads(data, what=what, max_depth=None)
    except json_depth.JsonDepthError as e:
        raise ProtocolError(str(e)) from None
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
