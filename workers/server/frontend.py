"""`Frontend`: the front process's logic between the HTTP routes and the rank processes.

Every command to the ranks goes through one FIFO `asyncio.Lock`, and the blocking pipe I/O runs
in a worker thread, never on the event loop. So commands reach the ranks one at a time, in
arrival order: a generation never sees a half-applied weight update, and the weight version it
reports is the one it ran with.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from workers.config import ServerArgs
from workers.errors import NotReadyError, RankDeadError, RankError, RankTimeoutError, RequestError
from workers.models import ModelConfig
from workers.server.ranks import RankGroup
from workers.server.schemas import GenerateRequest
from workers.server.state import READY, WeightState
from workers.server.tokenizer import TextCodec
from workers.server.worker import RPC_METHODS, WEIGHT_CHANGING_METHODS

DEFAULT_MAX_NEW_TOKENS = 16


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
        self._lock = asyncio.Lock()

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

    def health(self) -> tuple[bool, dict[str, Any]]:
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
        input_ids = self._input_ids(req)
        new_tokens = req.new_tokens(DEFAULT_MAX_NEW_TOKENS)
        if len(input_ids) + new_tokens > self.model.max_position_embeddings:
            raise RequestError(
                f"{len(input_ids)} prompt + {new_tokens} new tokens exceed the model's "
                f"{self.model.max_position_embeddings} positions"
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
            try:
                values = await self._run(method, args, kwargs, timeout)
            except RankError as e:
                if e.weights_modified or isinstance(e, RankTimeoutError | RankDeadError):
                    self.state.mark_inconsistent(
                        f"{method} failed mid-way; nothing is served until an update "
                        f"succeeds (last committed weight version: {self.state.version!r}): {e}"
                    )
                raise
            self.state.commit(version)
            return values

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
        async with self._lock:
            values = await self._run("get_weights_info", [], {}, self.args.rank_timeout)
            info = values[0]
            body = {
                "weight_version": self.state.version,
                "status": self.state.status(time.monotonic()),
                "checksum": info["checksum"],
                "tensors": info["tensors"],
            }
            if self.state.problem is not None:
                body["detail"] = self.state.problem
            return body
