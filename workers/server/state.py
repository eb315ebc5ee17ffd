"""The front's weight state: may the server answer /generate and report healthy?

Fail closed: dummy weights, or any weights under `--wait-for-initial-weights`, are not servable
until a weight update succeeds on every rank; an update that fails after writing part of the
weights (or whose outcome is unknown: timeout, dead rank) makes them unservable again until the
next successful one. The version changes only on a successful update that names one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

READY = "ready"
WAITING = "waiting_for_initial_weights"
WAIT_TIMED_OUT = "initial_weights_timeout"
INCONSISTENT = "weights_inconsistent"


@dataclass
class WeightState:
    version: str
    servable: bool
    wait_deadline: float | None = None  # monotonic time; None: no deadline
    problem: str | None = None
    _timeout_logged: bool = False

    @classmethod
    def at_startup(
        cls, *, version: str, real_weights: bool, wait: bool, wait_timeout: float, now: float
    ) -> WeightState:
        servable = real_weights and not wait
        deadline = now + wait_timeout if wait else None
        return cls(version=version, servable=servable, wait_deadline=deadline)

    def status(self, now: float) -> str:
        if self.servable:
            return READY
        if self.problem is not None:
            return INCONSISTENT
        if self.wait_deadline is not None and now >= self.wait_deadline:
            if not self._timeout_logged:
                logger.error("no initial weights arrived before the deadline; staying unhealthy")
                self._timeout_logged = True
            return WAIT_TIMED_OUT
        return WAITING

    def commit(self, version: str | None) -> None:
        """Every rank applied a full update."""
        self.servable = True
        self.problem = None
        if version is not None:
            self.version = version

    def mark_inconsistent(self, reason: str) -> None:
        logger.error("weights are no longer servable: %s", reason)
        self.servable = False
        self.problem = reason
