"""Typed, versioned messages between the parameter server (PS) and a worker; no pickle.

Each message is one ZMQ frame of UTF-8 JSON: ``{"v": 1, "type": <type>, ...fields}``. Decoding
checks the size cap, the version, the type (dispatch on it) and every field's type; anything
else raises ProtocolError. Bytes (CUDA IPC handles) travel as base64 strings.

Sequence of one update over a REQ (PS) / REP (worker) pair::

    PS  -> Plan{buffer handle, slots, manifest of every tensor}   worker -> Ack{of: plan} | Error
    PS  -> Bucket{id, slot, tensors[name, dtype, shape, offset, nbytes]}  -> Ack{of: bucket, id} | Error
    ...                                                                    (once per bucket)
    PS  -> Done      (worker checks it got every tensor, releases buffer)  -> Ack{of: done} | Error
    PS  -> Commit    (all ranks succeeded; worker runs post_hook)          -> Ack{of: commit} | Error
  or, at any point after a failure anywhere:
    PS  -> Abort{reason}                                                   -> Ack{of: abort}
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ckpt_engine import dtypes
from ckpt_engine.errors import ProtocolError

VERSION = 1
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


def _shape(obj: dict, where: str) -> tuple[int, ...]:
    shape = _list(obj, "shape", where)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"{where}: shape must be a list of non-negative integers")
    return tuple(shape)


def _dtype(obj: dict, where: str) -> str:
    name = _str(obj, "dtype", where)
    if not dtypes.is_supported(name):
        raise ProtocolError(f"{where}: unknown dtype {name!r}")
    return name


# -- records inside messages -----------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """A manifest entry: a tensor the update will deliver."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def parse(cls, obj: Any, where: str) -> TensorSpec:
        obj = _dict(obj, where)
        return cls(_str(obj, "name", where), _dtype(obj, where), _shape(obj, where))


@dataclass(frozen=True)
class TensorSlot:
    """A tensor of a bucket: ``nbytes`` bytes at ``offset`` from the start of the slot."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @classmethod
    def parse(cls, obj: Any, where: str) -> TensorSlot:
        obj = _dict(obj, where)
        return cls(
            _str(obj, "name", where),
            _dtype(obj, where),
            _shape(obj, where),
            _int(obj, "offset", where),
            _int(obj, "nbytes", where),
        )


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
    manifest: tuple[TensorSpec, ...]

    @classmethod
    def parse(cls, obj: dict, w: str) -> Plan:
        return cls(
            update_id=_str(obj, "update_id", w),
            rank=_int(obj, "rank", w),
            device_key=_str(obj, "device_key", w),
            buffer=_buffer(obj, w),
            num_slots=_int(obj, "num_slots", w),
            slot_bytes=_int(obj, "slot_bytes", w),
            num_buckets=_int(obj, "num_buckets", w),
            recv_timeout_s=_float(obj, "recv_timeout_s", w),
            manifest=tuple(
                TensorSpec.parse(t, f"{w}.manifest[{i}]")
                for i, t in enumerate(_list(obj, "manifest", w))
            ),
        )


@dataclass(frozen=True)
class Bucket:
    TYPE: ClassVar[str] = "bucket"
    update_id: str
    id: int
    slot: int
    tensors: tuple[TensorSlot, ...]

    @classmethod
    def parse(cls, obj: dict, w: str) -> Bucket:
        return cls(
            update_id=_str(obj, "update_id", w),
            id=_int(obj, "id", w),
            slot=_int(obj, "slot", w),
            tensors=tuple(
                TensorSlot.parse(t, f"{w}.tensors[{i}]")
                for i, t in enumerate(_list(obj, "tensors", w))
            ),
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

    @classmethod
    def parse(cls, obj: dict, w: str) -> Ack:
        of = _str(obj, "of", w)
        if of not in ACK_OF:
            raise ProtocolError(f"{w}: ack of unknown stage {of!r}")
        return cls(update_id=_str(obj, "update_id", w), of=of, id=_int(obj, "id", w, optional=True))


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
    if isinstance(value, (TensorSpec, TensorSlot)):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def encode(msg: Message, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """One frame of JSON; ProtocolError if it exceeds ``max_bytes``."""
    body = {"v": VERSION, "type": msg.TYPE}
    body.update({f.name: _plain(getattr(msg, f.name)) for f in fields(msg)})
    data = json.dumps(body, separators=(",", ":")).encode("utf-8")
    if len(data) > max_bytes:
        raise ProtocolError(f"{msg.TYPE} message of {len(data)} bytes exceeds the cap {max_bytes}")
    return data


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one frame; ProtocolError names what is wrong."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the cap {max_bytes}")
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"message is not JSON: {e}") from e
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
    return cls.parse(obj, kind)
