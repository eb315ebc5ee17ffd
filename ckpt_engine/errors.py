"""Named exceptions, one per failure domain. All derive from CkptEngineError."""

from __future__ import annotations


class CkptEngineError(Exception):
    """Base class of every error ckpt_engine raises on purpose."""


class CheckpointFileError(CkptEngineError):
    """A checkpoint file is unusable; names the file and the problem."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class CheckpointError(CkptEngineError):
    """Registering, looking up or unregistering a checkpoint failed (not a file's fault)."""


class HostCopyError(CheckpointError):
    """A batched host-to-host copy (ckpt_engine.ps.hostcopy) failed or made no progress."""


class MetasError(CkptEngineError):
    """Tensor metadata is missing, malformed, or disagrees between ranks."""


class ProtocolError(CkptEngineError):
    """A message between parameter server and worker broke the wire protocol."""


class CollectiveError(CkptEngineError):
    """A control collective between parameter-server ranks failed (a peer died or timed out)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class WorkerError(CkptEngineError):
    """A worker failed, disconnected or did not answer in time (seen from the parameter server)."""

    def __init__(
        self,
        message: str,
        *,
        bucket: int | None = None,
        traceback: str = "",
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.bucket = bucket
        self.traceback = traceback
        self.timed_out = timed_out


class UpdateError(CkptEngineError):
    """An update failed; raised on every parameter-server rank alike.

    ``rank`` and ``bucket`` locate the first failure (either may be None when unknown, e.g. a
    failure before the first bucket); ``message`` is the worker's or the rank's own message;
    ``errors`` lists every failure reported by any rank, as plain dicts. ``untouched``: every
    rank of the update reported that its worker was sent no bucket (nor the end of the
    update), so no worker wrote a byte and every inference server still holds its previous
    weights exactly (False whenever that is not proven, e.g. after contact with another rank
    was lost).
    """

    def __init__(
        self,
        summary: str,
        *,
        rank: int | None = None,
        bucket: int | None = None,
        message: str = "",
        traceback: str = "",
        errors: list[dict] | None = None,
        untouched: bool = False,
    ) -> None:
        super().__init__(summary)
        self.untouched = untouched
        self.rank = rank
        self.bucket = bucket
        self.message = message
        self.traceback = traceback
        self.errors = errors if errors is not None else []


class UpdateTimeout(UpdateError):
    """An update failed because some wait (on a worker or on another rank) ran out of time."""


class UpdateAborted(CkptEngineError):
    """Worker side: the parameter server aborted the update (or vanished); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransferError(CkptEngineError):
    """A P2P read from an owner's host memory failed; ``owner`` names it (rank and address)."""

    def __init__(self, message: str, *, owner: str = "", timed_out: bool = False) -> None:
        super().__init__(message)
        self.owner = owner
        self.timed_out = timed_out


class ReadRefused(TransferError):
    """The owner refused a P2P read (bad token, unknown checkpoint, out-of-range bytes)."""

    def __init__(self, message: str, *, owner: str = "", code: str = "") -> None:
        super().__init__(message, owner=owner)
        self.code = code


class RegistryError(CkptEngineError):
    """The coordination registry (Redis) is unreachable, refuses us, or has no usable source."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out
