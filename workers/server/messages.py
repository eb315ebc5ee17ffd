"""Typed, versioned records between the HTTP front and the rank processes (JSON, no pickle).

Front -> every rank: `Call` (run a worker method, tagged with a sequence number) and `Shutdown`.
Rank -> front: `Ready` or `StartupFailed` once at startup, then one `Reply` or `Failure` per
`Call`, echoing its `seq` so that a late answer to a timed-out call is recognised and dropped.
Frames are capped at `MAX_FRAME_BYTES`; decoding checks the version, the type and every field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass
from typing import Any

from ckpt_engine import json_depth
from workers.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 << 20


@dataclass(frozen=True, kw_only=True)
class Call:
    seq: int
    method: str
    args: list
    kwargs: dict


@dataclass(frozen=True, kw_only=True)
class Shutdown:
    pass


@dataclass(frozen=True, kw_only=True)
class Ready:
    rank: int
    device: str
    parameter_bytes: int


@dataclass(frozen=True, kw_only=True)
class StartupFailed:
    rank: int
    error: str


@dataclass(frozen=True, kw_only=True)
class Reply:
    seq: int
    rank: int
    value: Any


@dataclass(frozen=True, kw_only=True)
class Failure:
    seq: int
    rank: int
    error: str
    weights_modified: bool  # True when the failed call had already written some weights


Message = Call | Shutdown | Ready | StartupFailed | Reply | Failure
MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls for cls in (Call, Shutdown, Ready, StartupFailed, Reply, Failure)
}
_JSON_TYPES = {int: int, str: str, bool: bool, list: list, dict: dict}


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], frozenset[str]]:
    """A record's field types and names (resolved once per type, not per frame)."""
    return typing.get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls))


def encode(msg: Message) -> bytes:
    name = type(msg).__name__
    if name not in MESSAGE_TYPES:
        raise ProtocolError(f"not a message record: {type(msg)!r}")
    data = json.dumps({"v": PROTOCOL_VERSION, "type": name, **dataclasses.asdict(msg)}).encode()
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"{name} message of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    return data


def decode(data: bytes) -> Message:
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    try:  # every field is checked at its type below: the parser's depth limit suffices
        raw = json_depth.loads(data, what="frame", max_depth=None)
    except json_depth.JsonDepthError as e:
        raise ProtocolError(str(e)) from None
    except ValueError as e:
        raise ProtocolError(f"frame is not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ProtocolError("frame is not a JSON object")
    if raw.pop("v", None) != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version mismatch: want {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(raw.pop("type", None))
    if cls is None:
        raise ProtocolError(f"unknown message type; known: {', '.join(MESSAGE_TYPES)}")
    hints, names = _schema(cls)
    if set(raw) != names:
        raise ProtocolError(f"{cls.__name__}: fields {sorted(raw)} != {sorted(names)}")
    for name, value in raw.items():
        want = _JSON_TYPES.get(hints[name])
        ok = want is None or (
            isinstance(value, want) and not (want is int and isinstance(value, bool))
        )
        if not ok:
            raise ProtocolError(f"{cls.__name__}.{name}: expected {want.__name__}")
    return cls(**raw)
