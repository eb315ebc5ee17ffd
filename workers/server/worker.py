"""`RankWorker`: what one tensor-parallel rank process can do, and the one table of what the
HTTP front may ask of it.

`RPC_METHODS` is the allowlist of `/collective_rpc` (vLLM shape): any other name is refused by
the front before it reaches a rank, and again here. `FRONT_METHODS` are called only by the
front's own endpoints. Methods in `WEIGHT_CHANGING_METHODS` write weights: the front runs them
under its FIFO lock, commits a new weight version when every rank succeeds, and stops serving
(fail closed) when one fails after writing part of the weights.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from workers.config import ServerArgs
from workers.distributed import TensorParallel, init_tensor_parallel
from workers.errors import WeightCheckError, WorkersError
from workers.model_loader import get_load_format
from workers.models import ModelConfig, build_model, resolve_dtype
from workers.models.weights import combined_digest, tensor_digest
from workers.server.generate import greedy_generate

logger = logging.getLogger(__name__)

RPC_METHODS: dict[str, str] = {
    "ping": "() -> {rank, device, pid}: liveness of every rank",
    "get_weights_info": "() -> {tensors: {name: {dtype, shape, sha256}}, checksum} (rank 0)",
    "check_weights": "(metas: [[name, dtype, shape], ...]) -> problems of an update, write nothing",
    "update_weights_from_disk": "(model_path=None) -> loaded names count: reload safetensors",
    "update_weights_from_ipc": "(zmq_handles: {device_key: zmq_address}) -> {tensors, bytes}",
}
WEIGHT_CHANGING_METHODS = frozenset({"update_weights_from_disk", "update_weights_from_ipc"})
FRONT_METHODS = frozenset(
    {
        "generate",
        # remote-instance fork, seed side (workers.remote_instance.routes) and client side
        "remote_instance_manifest",
        "init_weights_send_group",
        "send_weights_to_remote_instance",
        "remote_instance_weight_version",
        "remote_instance_transfer_engine_info",
    }
)


class RankWorker:
    def __init__(
        self, *, args: ServerArgs, tp: TensorParallel, model, device: torch.device
    ) -> None:
        self.args = args
        self.tp = tp
        self.model = model
        self.device = device
        self.tensors_written = 0  # by weight updates; tells the front whether a failure wrote
        self.forked_weight_version: str | None = None  # set by `create` after a fork
        self.te_seed = None  # transfer_engine seed (registered parameters), when asked for

    @classmethod
    def create(cls, rank: int, args: ServerArgs, store_port: int) -> RankWorker:
        """Join the TP group, build the model on this rank's device, load the initial weights."""
        if args.device == "cuda":
            device = torch.device("cuda", args.base_gpu_id + rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.tp))
        tp = init_tensor_parallel(
            rank=rank,
            size=args.tp,
            store_port=store_port,
            device=device,
            timeout_s=args.rank_timeout,
        )
        config = ModelConfig.from_pretrained(args.model_path)
        model = build_model(config, tp=tp, dtype=resolve_dtype(args.dtype, config), device=device)
        load_format = get_load_format(args.load_format, seed=args.seed, args=args)
        start = time.perf_counter()
        load_format.load(model, args.model_path)
        seconds = time.perf_counter() - start
        logger.info(
            "rank %d: %s weights loaded on %s in %.3f s", rank, args.load_format, device, seconds
        )
        worker = cls(args=args, tp=tp, model=model, device=device)
        worker.forked_weight_version = getattr(load_format, "weight_version", None)
        from workers.remote_instance.transfer_engine import start_seed_if_asked

        worker.te_seed = start_seed_if_asked(args, model, tp)
        return worker

    @property
    def device_index(self) -> int:
        """The device index ckpt_engine's device keys use: the CUDA index, the TP rank on CPU."""
        return self.device.index if self.device.type == "cuda" else self.tp.rank

    @property
    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def call(self, method: str, args: list, kwargs: dict) -> Any:
        if method not in RPC_METHODS and method not in FRONT_METHODS:
            raise WorkersError(
                f"method {method!r} is not callable; allowed: {', '.join(RPC_METHODS)}"
            )
        return getattr(self, method)(*args, **kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """`model.load_weights`, counted: the `run` callback of weight updates."""
        names = self.model.load_weights(weights)
        self.tensors_written += len(names)
        return names

    # ---- front methods -------------------------------------------------------------------

    def generate(
        self,
        input_ids: list[int],
        max_new_tokens: int,
        stop_token_ids: list[int],
        return_logits: bool = False,
    ) -> dict[str, Any] | None:
        out = greedy_generate(
            self.model,
            input_ids,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids,
            return_logits=return_logits,
        )
        if self.tp.rank != 0:
            return None
        result = {"output_ids": out.output_ids, "finish_reason": out.finish_reason}
        if out.logits is not None:
            result["logits"] = out.logits
        return result

    # ---- remote-instance fork (front methods; workers.remote_instance) ---------------------

    @functools.cached_property
    def _sender(self):
        from workers.env import ENV
        from workers.remote_instance.seed import WeightSender

        timeout = self.args.remote_instance_weight_loader_timeout
        return WeightSender(
            self.model, self.tp, self.device, timeout=timeout, delay=ENV.test_fork_delay_s
        )

    def remote_instance_manifest(self) -> dict[str, Any] | None:
        return self._sender.manifest()

    def init_weights_send_group(self, **kwargs: Any) -> None:
        self._sender.init_group(**kwargs)

    def send_weights_to_remote_instance(self, **kwargs: Any) -> dict[str, Any]:
        return self._sender.send(**kwargs)

    def remote_instance_transfer_engine_info(self) -> dict[str, Any] | None:
        """Mooncake session, addresses and layouts of this rank's parameters (None when this
        server is no transfer_engine seed), and `tensors_written` (changes when weights do)."""
        if self.te_seed is None:
            return None
        return {**self.te_seed.info(), "tensors_written": self.tensors_written}

    def remote_instance_weight_version(self) -> str | None:
        """The seed's weight version this rank forked (rank 0; None when not forked)."""
        return self.forked_weight_version

    # ---- RPC methods (RPC_METHODS) ----------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return {"rank": self.tp.rank, "device": str(self.device), "pid": os.getpid()}

    def get_weights_info(self) -> dict[str, Any] | None:
        """Checksums per checkpoint tensor (collective: every rank gathers, rank 0 hashes)."""
        tensors = {}
        for name, tensor in self.model.checkpoint_tensors():
            if self.tp.rank == 0:
                tensors[name] = tensor_digest(tensor)
        if self.tp.rank != 0:
            return None
        return {"tensors": tensors, "checksum": combined_digest(tensors)}

    def check_weights(self, metas: list[list[Any]]) -> list[str]:
        if not isinstance(metas, list) or not all(
            isinstance(m, list | tuple) and len(m) == 3 for m in metas
        ):
            raise WorkersError("metas must be a list of [name, dtype, shape]")
        return self.model.check_weights([tuple(m) for m in metas], exact_dtype=True)

    def update_weights_from_disk(self, model_path: str | None = None) -> int:
        """Reload every tensor from a safetensors folder (default: --model-path), checked from
        the headers first, so a checkpoint that does not fit changes nothing."""
        path = self.args.model_path if model_path is None else model_path
        if not isinstance(path, str):
            raise WorkersError("model_path must be a string")
        before = self.tensors_written
        get_load_format("auto").load(self.model, path, write=self.load_weights)
        return self.tensors_written - before

    def update_weights_from_ipc(self, zmq_handles: dict[str, str]) -> int:
        """Apply one update pushed by the parameter server (ckpt_engine) through ZMQ + IPC.

        This rank picks the socket of its own device (`ckpt_engine.device_key`: GPU-<uuid>, or
        CPU-<host>-<tp rank> on CPU) and runs ckpt_engine's worker primitive with:
        - validate: before any byte is written, the whole manifest must fit the model
          (`model.check_weights`: names, shapes, dtypes) and cover every checkpoint tensor; else
          the update is refused on every rank and nothing changes (the server keeps serving);
        - run: `model.load_weights` on each bucket, counted, so a failure after some bucket was
          written reports `weights_modified` and the front stops serving (fail closed);
        - post_hook: `model.process_weights_after_loading()` (every module's, then the
          model's own), once, after every rank received every bucket;
        - keeps: the rows of each tensor this rank loads (P2P receivers read only those).
        Returns {"tensors": written, "bytes": received}; the front commits the weight version
        when every rank returns."""
        if not isinstance(zmq_handles, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in zmq_handles.items()
        ):
            raise WorkersError("zmq_handles must map device keys (str) to ZMQ addresses (str)")
        from ckpt_engine import device_key
        from ckpt_engine import update_weights_from_ipc as receive

        key = device_key(self.device_index, device_type=self.device.type)
        if key not in zmq_handles:
            raise WorkersError(
                f"zmq_handles has no socket for this rank's device {key} "
                f"(got {', '.join(sorted(zmq_handles)) or 'none'}); weights unchanged"
            )
        before = self.tensors_written
        buckets = itertools.count()
        received = 0

        def run(weights: list[tuple[str, torch.Tensor]]) -> None:
            nonlocal received
            self._maybe_inject_failure(next(buckets))
            received += sum(t.numel() * t.element_size() for _, t in weights)
            self.load_weights(weights)

        receive(
            self._zmq_ctx,
            zmq_handles[key],
            self.device_index,
            run=run,
            validate=self._validate_manifest,
            post_hook=self.model.process_weights_after_loading,
            keeps=self._keeps,
        )
        return {"tensors": self.tensors_written - before, "bytes": received}

    def _keeps(self, manifest: list) -> dict[str, tuple[int, int, int]]:
        """{checkpoint name: (dim, start, length)} of the tensors this rank loads only rows of
        (its parameters' `ShardLayout.kept`), for the parameter server (P2P: each receiver then
        reads only those rows). Only where loading is the layout's own `load`."""
        params = dict(self.model.named_parameters())
        out = {}
        for spec in manifest:
            try:
                pname, sid = self.model.resolve(spec.name)
            except KeyError:
                continue
            param = params.get(pname)
            layout = getattr(param, "shard_layout", None)
            if layout is None or getattr(param, "weight_loader", None) != layout.load:
                continue
            if (kept := layout.kept(sid)) is not None:
                out[spec.name] = kept
        return out

    @functools.cached_property
    def _zmq_ctx(self):
        import zmq

        return zmq.Context()

    def _validate_manifest(self, manifest: list) -> None:
        """Refuse, before any write, an update that does not fit or does not cover the model."""
        from ckpt_engine.dtypes import to_torch

        metas = [(spec.name, to_torch(spec.dtype), spec.shape) for spec in manifest]
        problems = self.model.check_weights(metas, exact_dtype=True)
        sent = {spec.name for spec in manifest}
        problems += [
            f"{n}: not in the update" for n in self.model.checkpoint_names() if n not in sent
        ]
        if problems:
            raise WeightCheckError(problems)

    def _maybe_inject_failure(self, bucket: int) -> None:
        """Tests only (CKPT_ENGINE_TEST_FAIL_UPDATE_FILE): while that file exists, the last TP
        rank fails the bucket whose index it holds (``"<n>"``), or, with ``"<n> wait"``, writes
        ``<file>.reached`` at that bucket and waits (at most 300 s) until the file is removed,
        so that a test can kill the updater mid-update at a known point."""
        from workers.env import ENV

        path = ENV.test_fail_update_file
        if path is None or self.tp.rank != self.tp.size - 1:
            return
        try:
            target, *mode = Path(path).read_text().split()
            target = int(target)
        except (OSError, ValueError):
            return
        if bucket != target:
            return
        if mode == ["wait"]:
            Path(path + ".reached").write_text(str(bucket))
            deadline = time.monotonic() + 300
            while Path(path).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return
        raise WorkersError(f"injected failure in bucket {bucket} ({path})")
