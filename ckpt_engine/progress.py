"""Progress of long user-facing work: registering a checkpoint, a P2P pull, a fork's load.

Shown by rank 0 only (one bar or one stream of lines per job, not one per rank):
- ``bar``: a tqdm bar on stderr, drawn only once the work has taken ``DELAY_S`` (short work
  draws nothing);
- ``log``: a plain log line (logger ``ckpt_engine.progress``, INFO) every interval, e.g.
  ``register 'ckpt': 12.0 of 40.0 GB (30%), 2.10 GB/s, about 13 s left``; nothing for work
  shorter than one interval;
- ``off``: nothing.
``auto`` (the default) is ``bar`` when stderr is a terminal, else ``log``. Set with
CKPT_ENGINE_PROGRESS (``auto|bar|log|off``) and CKPT_ENGINE_PROGRESS_INTERVAL_S (default 10 s).
``advance`` may be called from several threads (the read threads of a registration).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from ckpt_engine import env

logger = logging.getLogger("ckpt_engine.progress")

MODES = ("auto", "bar", "log", "off")
DEFAULT_INTERVAL_S = 10.0
DELAY_S = 2.0  # a bar appears only for work that takes longer


def resolve_mode(mode: str | None, *, rank: int, isatty: bool) -> str:
    """The effective mode (``bar``, ``log`` or ``off``) of rank ``rank``."""
    mode = mode if mode is not None else (env.progress_mode() or "auto")
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: supported: {', '.join(MODES)}")
    if rank != 0 or mode == "off":
        return "off"
    if mode == "auto":
        return "bar" if isatty else "log"
    return mode


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


class Progress:
    """``with Progress("register 'x'", total_bytes, rank=r) as p: ... p.advance(n) ...``"""

    def __init__(
        self,
        what: str,
        total: int,
        *,
        rank: int,
        mode: str | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.what = what
        self.total = max(0, int(total))
        self.mode = resolve_mode(mode, rank=rank, isatty=_stderr_isatty())
        env_interval = env.progress_interval_s()
        self.interval_s = (
            interval_s
            if interval_s is not None
            else (env_interval if env_interval is not None else DEFAULT_INTERVAL_S)
        )
        if not self.interval_s > 0:
            raise ValueError(f"progress interval must be positive, got {self.interval_s}")
        self.done = 0
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._next_log = self._start + self.interval_s
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                desc=what,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                delay=DELAY_S,
                file=sys.stderr,
                leave=False,
            )

    def advance(self, n: int) -> None:
        if self.mode == "off" or n <= 0:
            return
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
                return
            now = time.monotonic()
            if now >= self._next_log:
                self._next_log = now + self.interval_s
                logger.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """The ``log`` mode's line for the progress so far."""
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.what}: {_gb(self.done)} of {_gb(self.total)} GB"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {rate / 1e9:.2f} GB/s"
        if rate > 0 and self.total > self.done:
            text += f", about {(self.total - self.done) / rate:.0f} s left"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stderr_isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
