"""`GET /metrics`: what the front process sees, in Prometheus text format (prometheus-client).

The server is a front process plus one process per tensor-parallel rank; every weight update,
fork send and generation passes through the front, so the front alone counts them (one registry
per server, no multiprocess mode).

| metric                                          | type      | labels          |
| ckpt_engine_weight_version_info                 | info      | version         |
| ckpt_engine_serving_state                       | state set | state           |
| ckpt_engine_updates_started_total               | counter   | method          |
| ckpt_engine_updates_succeeded_total             | counter   | method          |
| ckpt_engine_updates_failed_total                | counter   | method, cause   |
| ckpt_engine_update_duration_seconds             | histogram | (successful)    |
| ckpt_engine_update_bytes                        | histogram | (successful IPC updates: bytes rank 0 received) |
| ckpt_engine_seconds_since_last_good_update      | gauge     | (absent before the first servable weights) |
| ckpt_engine_fork_sends_total                    | counter   | result          |
| ckpt_engine_fork_sent_bytes_total               | counter   |                 |
| ckpt_engine_generate_requests_total             | counter   | result          |
| ckpt_engine_generate_latency_seconds            | histogram | (successful)    |

`method` is the weight-changing method (`update_weights_from_ipc`, `update_weights_from_disk`).
`cause` of a failed update: `refused` (a rank failed it before writing any weight: the server
serves its previous weights), `failed_after_write` (weights partly written: the server stops
serving until an update succeeds), `timeout` (a rank did not answer), `rank_dead`, `error`
(anything else, e.g. a malformed reply).
`state`: the `/health` status (ready, waiting_for_initial_weights, initial_weights_timeout,
weights_inconsistent, rank_dead, unresponsive). The last good update is the last moment the
weights became servable: the startup load of real weights, or a successful update.

No API key, as vLLM and SGLang serve /metrics: scrapers rarely carry one, and the route is cheap
and read-only: it reads counters and the front's weight state, never hashes, never takes the
ranks' lock, never reaches a rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, StateSetMetricFamily
from prometheus_client.registry import Collector

from workers.errors import RankDeadError, RankError, RankTimeoutError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = (
    "ready",
    "waiting_for_initial_weights",
    "initial_weights_timeout",
    "weights_inconsistent",
    "rank_dead",
    "unresponsive",
)
FAILURE_CAUSES = ("refused", "failed_after_write", "timeout", "rank_dead", "error")
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
BYTES_BUCKETS = tuple(float(1 << s) for s in range(20, 42, 2))  # 1 MiB .. 2 TiB
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def failure_cause(e: Exception) -> str:
    if not isinstance(e, RankError):
        return "error"
    if isinstance(e, RankTimeoutError):
        return "timeout"
    if isinstance(e, RankDeadError):
        return "rank_dead"
    return "failed_after_write" if e.weights_modified else "refused"


class _Live(Collector):
    """Figures computed at scrape time from the front's state (cheap, lock-free)."""

    def __init__(self, read: Callable[[], tuple[str, str, float | None]]) -> None:
        self.read = read  # () -> (weight version, health status, seconds since last good)

    def collect(self) -> Iterator:
        version, status, since = self.read()
        info = InfoMetricFamily("ckpt_engine_weight_version", "Weight version being served")
        info.add_metric([], {"version": version})
        yield info
        state = StateSetMetricFamily("ckpt_engine_serving_state", "Health status of the server")
        state.add_metric([], {s: s == status for s in STATES})
        yield state
        if since is not None:
            yield GaugeMetricFamily(
                "ckpt_engine_seconds_since_last_good_update",
                "Seconds since the weights last became servable (startup load or update)",
                value=since,
            )


class ServerMetrics:
    """The server's counters; `render()` is the /metrics body."""

    def __init__(self, read_live: Callable[[], tuple[str, str, float | None]]) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.updates_started = Counter(
            "ckpt_engine_updates_started", "Weight updates started", ["method"], registry=r
        )
        self.updates_succeeded = Counter(
            "ckpt_engine_updates_succeeded",
            "Weight updates applied on every rank",
            ["method"],
            registry=r,
        )
        self.updates_failed = Counter(
            "ckpt_engine_updates_failed",
            "Weight updates failed, by cause",
            ["method", "cause"],
            registry=r,
        )
        self.update_duration = Histogram(
            "ckpt_engine_update_duration_seconds",
            "Seconds of a successful weight update (front to every rank and back)",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.update_bytes = Histogram(
            "ckpt_engine_update_bytes",
            "Bytes of a successful IPC weight update (what rank 0 received)",
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self.fork_sends = Counter(
            "ckpt_engine_fork_sends", "Remote-instance (fork) sends served", ["result"], registry=r
        )
        self.fork_bytes = Counter(
            "ckpt_engine_fork_sent_bytes", "Bytes sent to remote instances (all ranks)", registry=r
        )
        self.generate_requests = Counter(
            "ckpt_engine_generate_requests", "Generation requests", ["result"], registry=r
        )
        self.generate_latency = Histogram(
            "ckpt_engine_generate_latency_seconds",
            "Seconds of a successful generation request (lock wait included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_Live(read_live))

    def update_started(self, method: str) -> float:
        self.updates_started.labels(method).inc()
        return time.perf_counter()

    def update_succeeded(self, method: str, start: float, values: list) -> None:
        self.updates_succeeded.labels(method).inc()
        self.update_duration.observe(time.perf_counter() - start)
        first = values[0] if values else None
        if isinstance(first, dict) and isinstance(first.get("bytes"), int):
            self.update_bytes.observe(first["bytes"])

    def update_failed(self, method: str, e: Exception) -> None:
        self.updates_failed.labels(method, failure_cause(e)).inc()

    def fork_sent(self, nbytes: int | None) -> None:
        self.fork_sends.labels("ok" if nbytes is not None else "failed").inc()
        if nbytes:
            self.fork_bytes.inc(nbytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
