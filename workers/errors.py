"""Named exceptions of the inference side, one per failure domain.

The HTTP front maps them to status codes at the edge (`workers.server.http`); everything below
raises these, chained with `raise ... from e`, never bare asserts on user input.
"""

from __future__ import annotations


class WorkersError(Exception):
    """Base of every error raised on purpose by the `workers` package."""


class ConfigError(WorkersError, ValueError):
    """Server arguments or a model's config.json that cannot be served."""


class WeightLoadError(WorkersError):
    """Weights that do not fit the model: unknown names, wrong shapes, missing or duplicated."""


class WeightCheckError(WeightLoadError):
    """One or more (name, shape, dtype) records do not fit the model; nothing was written."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = "; ".join(self.problems[:20])
        more = f" (and {len(self.problems) - 20} more)" if len(self.problems) > 20 else ""
        super().__init__(f"{len(self.problems)} weight problem(s): {shown}{more}")


class MissingWeightsError(WeightLoadError):
    """A full load ended with parameters that no checkpoint tensor wrote."""

    def __init__(self, missing: list[str], source: str) -> None:
        self.missing = list(missing)
        shown = ", ".join(self.missing[:20])
        more = f" (and {len(self.missing) - 20} more)" if len(self.missing) > 20 else ""
        super().__init__(f"{source} lacks {len(self.missing)} tensor(s): {shown}{more}")


class DuplicateWeightError(WeightLoadError):
    """The same checkpoint tensor arrived twice within one load or update."""


class ProtocolError(WorkersError):
    """A message between the front and a rank process is malformed, too large or of another version."""


class RankError(WorkersError):
    """A tensor-parallel rank process failed a command; the message names the rank."""

    def __init__(self, message: str, *, ranks: list[int], weights_modified: bool = False) -> None:
        self.ranks = list(ranks)
        self.weights_modified = weights_modified
        super().__init__(message)


class RankDeadError(RankError):
    """A rank process exited (or closed its pipe) while the front needed it."""


class RankTimeoutError(RankError):
    """A rank did not answer a command before its deadline."""


class StartupError(WorkersError):
    """The rank processes could not start: the cause of each failed rank is in the message."""


class UpdateUnavailableError(WorkersError):
    """A weight update path this server cannot apply (yet); the weights were left untouched."""


class RequestError(WorkersError):
    """An HTTP request the server cannot act on as sent (HTTP 400)."""


class NotReadyError(WorkersError):
    """The server holds no servable weights now (HTTP 503): waiting, timed out, or inconsistent."""


class RemoteInstanceError(WeightLoadError):
    """A fork from a seed instance (`--load-format remote_instance`) failed; names the seed."""


class ManifestMismatchError(RemoteInstanceError):
    """Seed and client disagree on the model (config, names, dtypes, shapes); nothing was sent."""

    def __init__(self, problems: list[str], seed: str) -> None:
        self.problems = list(problems)
        shown = "; ".join(self.problems[:30])
        more = f" (and {len(self.problems) - 30} more)" if len(self.problems) > 30 else ""
        super().__init__(
            f"seed {seed} cannot serve this model: {len(self.problems)} difference(s): "
            f"{shown}{more}"
        )


class TransferError(RemoteInstanceError):
    """A transfer group could not form, broke, or made no progress before its deadline."""
