"""The wire of the portable P2P transport (pure): typed, versioned records, no pickle.

A reader sends one frame, a JSON ``ReadRequest`` (token, checkpoint, buffer, offset, length, and
optionally count and stride: ``count`` runs of ``length`` bytes, each ``stride`` after the
previous, a column shard); the owner answers a JSON ``DataReply`` frame followed by exactly
``count * length`` raw bytes (one run: sent zero-copy from the registered host buffer; several:
packed by one copy), or one JSON ``ErrorReply`` frame. Headers are
capped at ``MAX_HEADER_BYTES``, reads at ``MAX_READ_BYTES``; ``check_read`` is the owner's
whole authorization: the token of that checkpoint (compared in constant time) and bounds inside
one registered buffer. Nothing outside the registered ranges can be named by a request.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from ckpt_engine import json_depth
from ckpt_engine.errors import ProtocolError, ReadRefused

PROTOCOL = "ckpt-engine-p2p"
VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_READ_BYTES = 1 << 30

# ErrorReply codes
BAD_REQUEST = "bad_request"
BAD_TOKEN = "bad_token"
OUT_OF_RANGE = "out_of_range"


@dataclass(frozen=True, kw_only=True)
class ReadRequest:
    TYPE: ClassVar[str] = "read"
    id: int
    token: str
    checkpoint: str
    buffer: int
    offset: int
    length: int
    count: int = 1  # runs of ``length`` bytes, each ``stride`` after the previous (packed reply)
    stride: int = 0

    @property
    def total(self) -> int:
        return self.count * self.length


@dataclass(frozen=True, kw_only=True)
class DataReply:
    TYPE: ClassVar[str] = "data"
    id: int
    length: int


@dataclass(frozen=True, kw_only=True)
class ErrorReply:
    TYPE: ClassVar[str] = "error"
    id: int
    code: str
    message: str


Message = ReadRequest | DataReply | ErrorReply
_TYPES: dict[str, type] = {c.TYPE: c for c in (ReadRequest, DataReply, ErrorReply)}
_FIELDS: dict[type, dict[str, type]] = {
    ReadRequest: {
        "id": int,
        "token": str,
        "checkpoint": str,
        "buffer": int,
        "offset": int,
        "length": int,
    },
    DataReply: {"id": int, "length": int},
    ErrorReply: {"id": int, "code": str, "message": str},
}
# Fields a reader of an earlier version did not send (their defaults apply).
_OPTIONAL: dict[type, dict[str, type]] = {ReadRequest: {"count": int, "stride": int}}


def encode(msg: Message) -> bytes:
    data = json.dumps(
        {"protocol": PROTOCOL, "v": VERSION, "type": msg.TYPE, **asdict(msg)},
        separators=(",", ":"),
    ).encode()
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{msg.TYPE} header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    return data


def decode(data: bytes) -> Message:
    """Parse and type-check one header frame; ProtocolError on anything unexpected."""
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        obj: Any = json_depth.loads(data, what="header")
    except json_depth.JsonDepthError as e:
        raise ProtocolError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"header is not JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("protocol") != PROTOCOL:
        raise ProtocolError("not a ckpt-engine-p2p message")
    if obj.get("v") != VERSION:
        raise ProtocolError(
            f"protocol version {json_depth.describe(obj.get('v'))} is not supported ({VERSION})"
        )
    kind = obj.get("type")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {json_depth.describe(kind)}")
    fields = {}
    optional = _OPTIONAL.get(cls, {})
    for name, kind in {**_FIELDS[cls], **optional}.items():
        if name in optional and name not in obj:
            continue
        value = obj.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ProtocolError(f"{cls.TYPE}: field {name!r} missing or not {kind.__name__}")
        if kind is int and value < 0:
            raise ProtocolError(f"{cls.TYPE}: field {name!r} is negative")
        fields[name] = value
    return cls(**fields)


@dataclass(frozen=True)
class Export:
    """What an owner serves of one checkpoint: its token and its buffers' sizes."""

    token: str
    buffer_bytes: tuple[int, ...]


def check_read(req: ReadRequest, exports: Mapping[str, Export]) -> None:
    """Authorize one read; ReadRefused(code) says why not."""
    export = exports.get(req.checkpoint)
    # The same answer for an unknown checkpoint and a wrong token, so that a reader without the
    # token learns nothing about what is registered.
    if export is None or not hmac.compare_digest(export.token.encode(), req.token.encode()):
        raise ReadRefused(
            f"refused: bad token, or checkpoint {req.checkpoint!r} not served", code=BAD_TOKEN
        )
    if req.total > MAX_READ_BYTES:
        raise ReadRefused(
            f"refused: read of {req.total} bytes > {MAX_READ_BYTES}", code=BAD_REQUEST
        )
    if req.count < 1 or (req.count > 1 and req.stride < req.length):
        raise ReadRefused(
            f"refused: {req.count} runs of {req.length} bytes, {req.stride} apart",
            code=BAD_REQUEST,
        )
    if req.buffer >= len(export.buffer_bytes):
        raise ReadRefused(f"refused: buffer {req.buffer} does not exist", code=OUT_OF_RANGE)
    size = export.buffer_bytes[req.buffer]
    end = req.offset + (req.count - 1) * req.stride + req.length
    if end > size:
        raise ReadRefused(
            f"refused: bytes [{req.offset}, {end}) are outside buffer {req.buffer} ({size} bytes)",
            code=OUT_OF_RANGE,
        )
