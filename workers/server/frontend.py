"""`Frontend`: the front process's logic between the HTTP routes and the rank processes.

Every command to the ranks goes through one FIFO `asyncio.Lock`, and the blocking pipe I/O runs
in a worker thread, never on the event loop. So commands reach the ranks one at a time, in
arrival order: a generation never sees a half-applied weight update, and the weight version it
reports is the one it ran with.

Two things a caller without a key can reach are kept off that lock or bounded:
- `/weights_info` hashes the whole model once per weight change (a generation counter bumped by
  every weight-changing command when it ends), then answers from the cache, also while an update
  holds the lock (the cache then describes the last committed version, the one it reports); the
  route needs the key when the server has one.
- After a rank timed out, `/health` reports "unresponsive" and probes the ranks with a `ping`
  (at most one probe per `PROBE_INTERVAL_S`, each bounded by `PROBE_TIMEOUT_S`, never while
  another command holds the lock); the first probe every rank answers clears it, so a load
  balancer that routes only to healthy servers sees the server come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from workers.config import ServerArgs
from workers.errors import NotReadyError, RankDeadError, RankError, RankTimeoutError, RequestError
from workers.models import ModelConfig
from workers.server.metrics import ServerMetrics
from workers.server.ranks import RankGroup
from workers.server.schemas import GenerateRequest
from workers.server.state import READY, WeightState
from workers.server.tokenizer import TextCodec
from workers.server.worker import RPC_METHODS, WEIGHT_CHANGING_METHODS

DEFAULT_MAX_NEW_TOKENS = 16
PROBE_INTERVAL_S = 5.0  # least time between two health probes of unresponsive ranks
PROBE_TIMEOUT_S = 5.0  # longest a health probe waits for the ranks (and holds the lock)
# Logits returned by one /generate (tokens x vocabulary floats): as JSON about 20 bytes each,
# so the reply stays well under the ranks' pipe frame cap (messages.MAX_FRAME_BYTES, 64 MiB),
# and a caller without a key cannot make a rank build gigabytes of them.
MAX_RETURNED_LOGITS = 2_000_000


class Frontend:
    def __init__(
        self,
        *,
        ranks: RankGroup,
        args: ServerArgs,
        model: ModelConfig,
        codec: TextCodec | None,
    ) -> None:
        self.ranks = ranks
        self.args = args
        self.model = model
        self.codec = codec
        self.state = WeightState.at_startup(
            version=args.weight_version,
            real_weights=args.load_format != "dummy",
            wait=args.wait_for_initial_weights,
            wait_timeout=args.wait_for_initial_weights_timeout,
            now=time.monotonic(),
        )
        self.unresponsive: str | None = None  # set by a rank timeout, cleared by the next success
        self._next_probe = 0.0  # time.monotonic() before which /health does not probe again
        self._weights_generation = 0  # bumped by every weight-changing command
        self._weights_info: tuple[int, dict[str, Any]] | None = None  # (generation, info)
        self._lock = asyncio.Lock()
        # A weight change is under way (set and cleared under the lock); `weight_listeners` are
        # called (no arguments, must not block) when it starts and ends: the registry's publisher
        # republishes this seed as not ready, then ready with the new version.
        self.changing_weights = False
        self.weight_listeners: list = []
        now = time.monotonic()
        self._last_good: float | None = now if self.state.servable else None
        self.metrics = ServerMetrics(self._live_figures)

    def _live_figures(self) -> tuple[str, str, float | None]:
        """(version, health status, seconds since the last good update) for /metrics: no
        lock, no rank call."""
        _, body = self._health()
        now = time.monotonic()
        since = None if self._last_good is None else now - self._last_good
        return self.state.version, body["status"], since

    async def _run(self, method: str, args: list, kwargs: dict, timeout: float) -> list[Any]:
        """One command on every rank; the caller holds the lock."""
        assert self._lock.locked()
        try:
            values = await asyncio.to_thread(self.ranks.call, method, args, kwargs, timeout=timeout)
        except RankTimeoutError as e:
            self.unresponsive = f"{method}: {e}"
            raise
        self.unresponsive = None
        return values

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """(servable, body); probes unresponsive ranks first (bounded; see the module doc)."""
        now = time.monotonic()
        if self.unresponsive is not None and not self._lock.locked() and now >= self._next_probe:
            self._next_probe = now + PROBE_INTERVAL_S
            async with self._lock:
                if self.unresponsive is not None and not self.ranks.dead_ranks():
                    timeout = min(self.args.rank_timeout, PROBE_TIMEOUT_S)
                    with contextlib.suppress(RankError):
                        await self._run("ping", [], {}, timeout)  # clears `unresponsive`
        return self._health()

    def _health(self) -> tuple[bool, dict[str, Any]]:
        status = self.state.status(time.monotonic())
        body: dict[str, Any] = {"status": status, "weight_version": self.state.version}
        if dead := self.ranks.dead_ranks():
            body.update(status="rank_dead", detail=f"rank(s) {dead} exited")
        elif self.unresponsive is not None:
            body.update(status="unresponsive", detail=self.unresponsive)
        elif self.state.problem is not None:
            body["detail"] = self.state.problem
        return body["status"] == READY, body

    def _require_servable(self) -> None:
        if dead := self.ranks.dead_ranks():
            raise RankDeadError(f"rank(s) {dead} exited", ranks=dead)
        status = self.state.status(time.monotonic())
        if status != READY:
            detail = f": {self.state.problem}" if self.state.problem else ""
            raise NotReadyError(f"no servable weights ({status}){detail}")

    async def generate(self, req: GenerateRequest) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            result = await self._generate(req)
        except RequestError:
            self.metrics.generate_requests.labels("bad_request").inc()
            raise
        except (NotReadyError, RankDeadError):
            self.metrics.generate_requests.labels("not_servable").inc()
            raise
        except Exception:
            self.metrics.generate_requests.labels("failed").inc()
            raise
        self.metrics.generate_requests.labels("ok").inc()
        self.metrics.generate_latency.observe(time.perf_counter() - start)
        return result

    async def _generate(self, req: GenerateRequest) -> dict[str, Any]:
        # tokenizing (up to --max-request-bytes of text) off the event loop
        input_ids = await asyncio.to_thread(self._input_ids, req)
        new_tokens = req.new_tokens(DEFAULT_MAX_NEW_TOKENS)
        if len(input_ids) + new_tokens > self.model.max_position_embeddings:
            raise RequestError(
                f"{len(input_ids)} prompt + {new_tokens} new tokens exceed the model's "
                f"{self.model.max_position_embeddings} positions"
            )
        if req.return_logits and new_tokens * self.model.vocab_size > MAX_RETURNED_LOGITS:
            raise RequestError(
                f"return_logits for {new_tokens} tokens x {self.model.vocab_size} vocabulary "
                f"entries exceeds {MAX_RETURNED_LOGITS} values; ask for at most "
                f"{MAX_RETURNED_LOGITS // self.model.vocab_size} new tokens"
            )
        stop = list(req.sampling_params.stop_token_ids)
        if not req.sampling_params.ignore_eos:
            stop += [t for t in self.model.eos_token_ids if t not in stop]
        kwargs = {
            "input_ids": input_ids,
            "max_new_tokens": new_tokens,
            "stop_token_ids": stop,
            "return_logits": req.return_logits,
        }
        async with self._lock:
            self._require_servable()
            values = await self._run("generate", [], kwargs, self.args.rank_timeout)
            version = self.state.version
        out = values[0]
        result = {
            "output_ids": out["output_ids"],
            "finish_reason": out["finish_reason"],
            "weight_version": version,
            "meta_info": {
                "weight_version": version,
                "prompt_tokens": len(input_ids),
                "completion_tokens": len(out["output_ids"]),
                "finish_reason": out["finish_reason"],
            },
        }
        if self.codec is not None:
            result["text"] = self.codec.decode(out["output_ids"])
        if "logits" in out:
            result["logits"] = out["logits"]
        return result

    def _input_ids(self, req: GenerateRequest) -> list[int]:
        if req.input_ids is not None:
            ids = req.input_ids
        elif self.codec is None:
            raise RequestError("this checkpoint ships no tokenizer.json: send input_ids, not text")
        else:
            ids = self.codec.encode(req.text or "")
            if not ids:
                raise RequestError("the text encodes to no tokens")
        bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise RequestError(
                f"token ids outside the vocabulary [0, {self.model.vocab_size}): {bad[:8]}"
            )
        return ids

    async def collective_rpc(
        self, method: str, args: list, kwargs: dict, timeout: float | None
    ) -> list[Any]:
        if method not in RPC_METHODS:
            raise RequestError(
                f"method {method!r} is not allowed; allowed: {', '.join(sorted(RPC_METHODS))}"
            )
        timeout = self.args.rank_timeout if timeout is None else timeout
        if method in WEIGHT_CHANGING_METHODS:
            return await self.change_weights(method, args, kwargs, version=None, timeout=timeout)
        async with self._lock:
            return await self._run(method, args, kwargs, timeout)

    async def change_weights(
        self, method: str, args: list, kwargs: dict, *, version: str | None, timeout: float
    ) -> list[Any]:
        """A weight-changing method on every rank: commit on success, fail closed otherwise."""
        async with self._lock:
            self._weights_changing(True)
            start = self.metrics.update_started(method)
            try:
                try:
                    values = await self._run(method, args, kwargs, timeout)
                except RankError as e:
                    self.metrics.update_failed(method, e)
                    if e.weights_modified or isinstance(e, RankTimeoutError | RankDeadError):
                        self.state.mark_inconsistent(
                            f"{method} failed mid-way; nothing is served until an update "
                            f"succeeds (last committed weight version: {self.state.version!r}): "
                            f"{e}"
                        )
                    raise
                except Exception as e:
                    self.metrics.update_failed(method, e)
                    raise
                finally:
                    # Whatever happened, the cached checksums are stale now (while the command
                    # ran they still described the last committed version, which
                    # /weights_info names).
                    self._weights_generation += 1
                self.state.commit(version)
                self._last_good = time.monotonic()
                self.metrics.update_succeeded(method, start, values)
                return values
            finally:
                self._weights_changing(False)  # after the commit: listeners see the outcome

    def _weights_changing(self, changing: bool) -> None:
        self.changing_weights = changing
        for listener in self.weight_listeners:
            listener()

    async def update_weights_from_ipc(
        self, zmq_handles: dict[str, str], version: str | None
    ) -> str:
        await self.change_weights(
            "update_weights_from_ipc",
            [],
            {"zmq_handles": zmq_handles},
            version=version,
            timeout=self.args.rank_timeout,
        )
        suffix = f" Weight version updated to {version}." if version is not None else ""
        return "IPC weight update completed successfully." + suffix

    async def run_exclusive(
        self, method: str, kwargs: dict, *, servable: bool
    ) -> tuple[list[Any], str]:
        """A front method on every rank under the FIFO lock, and the weight version it ran with
        (remote-instance sends: they read the weights, so no update may interleave; generation
        waits). With `servable`, refused (503) unless the weights are servable."""
        async with self._lock:
            if servable:
                self._require_servable()
            values = await self._run(method, [], kwargs, self.args.rank_timeout)
            return values, self.state.version

    async def weights_info(self) -> dict[str, Any]:
        """Version, status and checksums; the model is hashed (on the ranks, under the lock) once
        per weight change, later calls answer from the cache without taking the lock."""
        cached = self._weights_info
        if cached is None or cached[0] != self._weights_generation:
            async with self._lock:
                cached = self._weights_info
                if cached is None or cached[0] != self._weights_generation:
                    values = await self._run("get_weights_info", [], {}, self.args.rank_timeout)
                    cached = self._weights_info = (self._weights_generation, values[0])
        info = cached[1]
        body = {
            "weight_version": self.state.version,
            "status": self.state.status(time.monotonic()),
            "checksum": info["checksum"],
            "tensors": info["tensors"],
        }
        if self.state.problem is not None:
            body["detail"] = self.state.problem
        return body
