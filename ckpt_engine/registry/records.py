"""What a source publishes, and which source a newcomer takes (pure: no I/O, no clock reads).

A ``SourceRecord`` says: this instance of this model holds these weights (weight version,
manifest digest, TP layout), is (not) ready to be read, and is reached through these backends
(name -> plain JSON: what a reader needs, e.g. a seed's HTTP URL). ``generation`` counts the
source's weight changes, so a reader can tell that weights changed under it. ``heartbeat_at`` +
``ttl_s`` bound its life: a source that stops republishing disappears (Redis expires the key;
``choose`` also skips a stale one, against clock drift of the store).

``choose`` orders the usable sources: ready, same digest, a backend the reader runs, not
excluded (a source that just failed); then same TP size first, then least busy, then the most
recent heartbeat. ``passed_over`` says why every other source was not taken, for the error a
reader raises when it finds none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ckpt_engine import json_depth

RECORD_FORMAT = 1


class RecordError(ValueError):
    """A published record is malformed (names the field)."""


def digest(document: Any) -> str:
    """sha256 of a JSON document in canonical form (sorted keys, no spaces)."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class SourceRecord:
    model: str
    instance: str
    digest: str
    tp_size: int
    ready: bool
    weight_version: str | None = None
    generation: int = 0
    backends: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    heartbeat_at: float = 0.0  # unix time of the publication
    ttl_s: float = 10.0
    format: int = RECORD_FORMAT

    def __post_init__(self) -> None:
        for name in ("model", "instance", "digest"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise RecordError(f"{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.tp_size, int) or isinstance(self.tp_size, bool) or self.tp_size < 1:
            raise RecordError(f"tp_size must be a positive integer, got {self.tp_size!r}")
        if not isinstance(self.ready, bool):
            raise RecordError(f"ready must be true or false, got {self.ready!r}")
        if self.weight_version is not None and not isinstance(self.weight_version, str):
            raise RecordError(f"weight_version must be a string, got {self.weight_version!r}")
        if not isinstance(self.generation, int) or self.generation < 0:
            raise RecordError(f"generation must be an integer >= 0, got {self.generation!r}")
        if not isinstance(self.backends, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Mapping) for k, v in self.backends.items()
        ):
            raise RecordError("backends must map backend names to JSON objects")
        for name in ("heartbeat_at", "ttl_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise RecordError(f"{name} must be a number >= 0, got {value!r}")
        if self.ttl_s <= 0:
            raise RecordError("ttl_s must be positive")
        if self.format != RECORD_FORMAT:
            raise RecordError(f"record format {self.format!r}; this reader knows {RECORD_FORMAT}")

    def to_json(self) -> str:
        raw = asdict(self)
        raw["backends"] = {k: dict(v) for k, v in self.backends.items()}
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> SourceRecord:
        try:
            raw = json_depth.loads(text, what="record")
        except json_depth.JsonDepthError as e:
            raise RecordError(str(e)) from None
        except ValueError as e:
            raise RecordError(f"not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise RecordError("not a JSON object")
        known = set(cls.__dataclass_fields__)
        if unknown := sorted(set(raw) - known):
            raise RecordError(f"unknown fields {unknown}")
        try:
            return cls(**raw)
        except TypeError as e:
            raise RecordError(str(e)) from None

    def expired(self, now: float) -> bool:
        return now > self.heartbeat_at + self.ttl_s


@dataclass(frozen=True)
class Want:
    """What a reader needs of a source."""

    model: str
    digest: str
    tp_size: int
    backends: tuple[str, ...]  # those the reader runs, any of them will do


def _why_not(r: SourceRecord, want: Want, now: float, exclude: Iterable[str]) -> str | None:
    if r.model != want.model:
        return f"model {r.model!r}"
    if r.instance in exclude:
        return "failed already"
    if r.expired(now):
        return f"heartbeat {now - r.heartbeat_at:.0f} s old (ttl {r.ttl_s:g} s)"
    if not r.ready:
        return "not ready (loading or updating its weights)"
    if r.digest != want.digest:
        return f"other weights layout (digest {r.digest[:19]}..., want {want.digest[:19]}...)"
    if not set(r.backends) & set(want.backends):
        return f"offers {sorted(r.backends) or 'no backend'}, need one of {list(want.backends)}"
    return None


def choose(
    records: Iterable[SourceRecord],
    want: Want,
    *,
    now: float,
    busy: Mapping[str, int] | None = None,
    exclude: Iterable[str] = (),
) -> list[SourceRecord]:
    """The usable sources, best first: same TP size, then least busy, then freshest heartbeat."""
    busy = busy or {}
    exclude = set(exclude)
    usable = [r for r in records if _why_not(r, want, now, exclude) is None]
    return sorted(
        usable,
        key=lambda r: (
            r.tp_size != want.tp_size,
            busy.get(r.instance, 0),
            -r.heartbeat_at,
            r.instance,
        ),
    )


def passed_over(
    records: Iterable[SourceRecord], want: Want, *, now: float, exclude: Iterable[str] = ()
) -> list[str]:
    """``instance: reason`` for every record ``choose`` would not take."""
    exclude = set(exclude)
    out = []
    for r in records:
        why = _why_not(r, want, now, exclude)
        if why is not None:
            out.append(f"{r.instance}: {why}")
    return out
