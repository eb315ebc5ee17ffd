"""JSON read from outside the process, with its nesting bounded.

``json.loads`` raises a bare RecursionError on input nested past about
``sys.getrecursionlimit()`` levels (1000), and any code that walks a parsed document
recursively (a layout parser, ``dataclasses.asdict``, ``repr``) dies sooner. Every reader of
outside JSON goes through ``loads``, which turns both into ``JsonDepthError`` (a ValueError)
naming what was read, where, and the limit:

- ``max_depth`` (default ``MAX_DEPTH``): a stated limit, checked after parsing, for documents
  that code may walk (HTTP bodies, P2P requests, registry records, a seed's answers). The
  bodies and records we accept nest far less (a fork's layouts: 5 levels).
- ``max_depth=None``: only the parser's own limit, for frames whose readers take each field
  at its declared shape, never recursively (the parameter server <-> worker wire, metas files):
  deeper data is refused there as a wrong type, and walking 10^5 tensors' columns would cost
  milliseconds per message.

Depth counts containers: ``1`` and ``"a"`` are 0 deep, ``[]`` and ``{}`` 1, ``[[1]]`` 2.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64
PARSER_LIMIT = "the JSON parser's limit (about 1000 levels)"


class JsonDepthError(ValueError):
    """A JSON document nests deeper than its reader accepts; the message names it, the path to
    the first container past the limit, and the limit."""


def loads(data: str | bytes, *, what: str, max_depth: int | None = MAX_DEPTH) -> Any:
    """``json.loads(data)`` with nesting bounded (see the module doc). JSONDecodeError (a
    ValueError) for malformed input, as json.loads; JsonDepthError past the limit."""
    try:
        value = json.loads(data)
    except RecursionError:
        limit = PARSER_LIMIT if max_depth is None else _levels(max_depth)
        raise JsonDepthError(f"{what}: JSON nested deeper than {limit}") from None
    if max_depth is not None and may_exceed(data, max_depth):
        check_depth(value, what=what, max_depth=max_depth)
    return value


def may_exceed(data: str | bytes, max_depth: int) -> bool:
    """False when ``data`` has too few brackets to nest past ``max_depth`` (C-speed counts;
    brackets inside strings only make this answer True, never wrongly False)."""
    if isinstance(data, str):
        return data.count("[") + data.count("{") > max_depth
    return data.count(b"[") + data.count(b"{") > max_depth


def check_depth(value: Any, *, what: str, max_depth: int = MAX_DEPTH) -> None:
    """Raise JsonDepthError if ``value`` (parsed JSON) nests deeper than ``max_depth``; no
    recursion, whatever the depth."""
    path = too_deep(value, max_depth)
    if path is not None:
        raise JsonDepthError(
            f"{what}{format_path(path)}: JSON nested deeper than {_levels(max_depth)}"
        )


def _levels(n: int) -> str:
    return f"{n} level" if n == 1 else f"{n} levels"


def too_deep(value: Any, max_depth: int) -> tuple | None:
    """The path (keys and indices) to the first container ``max_depth + 1`` levels deep in
    ``value``, or None."""
    if not isinstance(value, dict | list):
        return None
    stack: list[tuple[Any, int, tuple]] = [(value, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if depth > max_depth:
            return path
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1, (*path, key)))
    return None


def format_path(path: tuple, shown: int = 6) -> str:
    """``.layouts['w'].inner[0]``: the first ``shown`` steps of ``path``, then an ellipsis."""
    out = "".join(f"[{k}]" if isinstance(k, int) else f"[{k!r}]" for k in path[:shown])
    return out + ("..." if len(path) > shown else "")


def describe(value: Any) -> str:
    """A decoded value for an error message: a scalar's repr (cut at 200 characters), the kind
    of a container (its repr could be huge, or recurse past the interpreter's limit)."""
    if isinstance(value, dict | list):
        return f"<a JSON {'object' if isinstance(value, dict) else 'array'}>"
    return repr(value)[:200]
