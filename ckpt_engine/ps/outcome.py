"""Outcome: how one update is going on one rank, and the one error every rank raises when it
fails.

A driver (ps/broadcast.py, ps/p2p.py) records here, as it goes, the phase it is in (``stage``)
and the bucket it works on; ``fail(exc)`` keeps the rank's first failure with them (later ones
are only logged); ``delivered`` is set before a Bucket, Done or Commit goes to the worker (from
then on it may write). ``vote`` is the all-reduce over the control group that ends the update
on every rank as soon as one failed (raising ``Voted``); then ``gathered`` all-gathers every
rank's record and ``delivered`` (every rank has stopped sending by then) into the UpdateError
that every rank raises alike: the earliest failure (stage, bucket, rank) leads, every other
one is listed, and ``untouched`` says that no rank delivered anything, so nothing was written.
"""

from __future__ import annotations

import logging
import traceback

from ckpt_engine.errors import CollectiveError, UpdateError, UpdateTimeout
from ckpt_engine.ps.collectives import ControlGroup

logger = logging.getLogger(__name__)

STAGES = ("prepare", "handshake", "bucket", "done", "commit", "req_func")


class Voted(Exception):
    """Some rank reported a failure in a vote."""


class Outcome:
    def __init__(
        self, *, name: str, rank: int, control: ControlGroup, update_id: str, vote_timeout_s: float
    ) -> None:
        self.name, self.rank, self.control = name, rank, control
        self.update_id = update_id
        self.vote_timeout_s = vote_timeout_s
        self.stage = "prepare"
        self.bucket: int | None = None
        self.error: dict | None = None  # this rank's first failure
        # a Bucket, Done or Commit was handed to the socket (the worker may have written): set
        # before the send, so a send that fails half-way counts as sent
        self.delivered = False

    def fail(self, exc: BaseException) -> None:
        if self.error is not None:
            return
        bucket = getattr(exc, "bucket", None)
        self.error = {
            "rank": self.rank,
            "stage": self.stage,
            "bucket": bucket if bucket is not None else self.bucket,
            "error": type(exc).__name__,
            "message": str(exc),
            "traceback": getattr(exc, "traceback", "") or traceback.format_exc(),
            "timed_out": bool(getattr(exc, "timed_out", False)),
        }
        logger.warning(
            "rank %d: update %s failed at %s: %s", self.rank, self.update_id, self.stage, exc
        )

    def vote(self, pending: bool = False) -> bool:
        """True if some rank is still pending; raises Voted if some rank failed."""
        err, pend = self.control.all_reduce(
            [int(self.error is not None), int(pending)],
            op="max",
            timeout_s=self.vote_timeout_s,
            what=f"vote ({self.stage})",
        )
        if err:
            raise Voted
        return bool(pend)

    def refused(self, errors: list[dict]) -> UpdateError:
        """The error of an update refused before any worker was contacted (every rank knows
        every failure already, e.g. from the prepare phase's all-gather)."""
        return update_error(self.name, errors, untouched=True)

    def lost_contact(self, exc: BaseException) -> UpdateError:
        """This rank's error alone: a collective with the other ranks failed."""
        self.fail(exc)
        return update_error(self.name, [self.error], lost_contact=True)

    def gathered(self) -> UpdateError:
        """Every rank's error record and whether it delivered anything to its worker."""
        try:
            records = self.control.all_gather_json(
                {"error": self.error, "delivered": self.delivered},
                timeout_s=self.vote_timeout_s,
                what="gather errors",
            )
        except CollectiveError as e:
            return self.lost_contact(e)
        errors = [r["error"] for r in records if r["error"]]
        untouched = not any(r["delivered"] for r in records)
        return update_error(self.name, errors, untouched=untouched)


def update_error(
    name: str, errors: list[dict], *, lost_contact: bool = False, untouched: bool = False
) -> UpdateError:
    """The exception of a failed update; the earliest failure (stage, bucket, rank) leads.
    ``untouched``: every rank said that its worker got no bucket (nor Done / Commit)."""

    def order(e: dict) -> tuple:
        stage = STAGES.index(e["stage"]) if e["stage"] in STAGES else len(STAGES)
        return (stage, e["bucket"] if e["bucket"] is not None else -1, e["rank"])

    first = min(errors, key=order)
    where = f"rank {first['rank']}"
    if first["bucket"] is not None:
        where += f", bucket {first['bucket']}"
    summary = f"update of {name!r} failed on {where} ({first['stage']}): {first['message']}"
    if lost_contact:
        summary += " [lost contact with the other ranks]"
    others = [e for e in errors if e is not first]
    if others:
        summary += f" (+{len(others)} more: "
        summary += "; ".join(f"rank {e['rank']}: {e['message']}" for e in others) + ")"
    cls = UpdateTimeout if first["timed_out"] else UpdateError
    return cls(
        summary,
        rank=first["rank"],
        bucket=first["bucket"],
        message=first["message"],
        traceback=first["traceback"],
        errors=errors,
        untouched=untouched and not lost_contact,
    )
