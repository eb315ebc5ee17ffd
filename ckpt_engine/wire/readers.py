"""Field readers of the wire's JSON: each returns the field or raises a ProtocolError naming
the message and the field (ckpt_engine.wire)."""

from __future__ import annotations

import base64
from typing import Any

from ckpt_engine.errors import ProtocolError


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
