"""Building many small objects at once (10^5 tensors' metadata) with the cyclic garbage
collector paused.

The records built here (tuples, lists, strings, ints) hold no reference cycles, so deferring
collection loses nothing; but in a process whose heap already holds millions of objects (a
checkpoint's tensors, an engine's model) the allocations trigger full collections that each
walk the whole heap: measured, gathering the metas of 150,000 tensors took 3.1-4.4 s with the
collector running and 1.4 s without, turning them into JSON 0.94 s vs 0.10 s.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

F = TypeVar("F", bound=Callable)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic collector inside the block, if it was running (process-wide)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def without_gc(fn: F) -> F:
    """Decorator: run ``fn`` with the cyclic collector paused."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with paused_gc():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
