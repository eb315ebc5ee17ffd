"""`--load-format remote_instance`: a client TP rank forks its weights from a running seed.

Per client rank, in `RankWorker.create` (before the server answers anything):
1. GET the seed's manifest (API key, timeout) and compare it with this model's own manifest;
   any difference (config field, tensor name, dtype, shape; per-rank layout with equal TP sizes)
   refuses the fork, listing them, before a byte moves.
2. Rank 0 draws a random client token, shared over the client's TP group; the group name is
   `send_weights_<token>`, so clients on one host (or one IP behind NAT) never collide.
3. Rank 0 POSTs /init_weights_send_group_for_remote_instance while every rank joins its pair
   group (`plan`) on its port; rank 0 then POSTs /send_weights_to_remote_instance while every
   rank receives, tensor by tensor, in the seed manifest's order, each into the tensor of the same
   name (shard mode: straight into the parameter; slice mode, at another TP size: only the
   pieces it keeps, into the parameter (`slices`); full mode: a buffer through `load_weights`).
4. `process_weights_after_loading` rebuilds derived state (buffers are compared, never sent);
   optionally every tensor's sha256 is compared with the seed's /weights_info.
Every step has the timeout; a failure raises `RemoteInstanceError` naming the seed and the tensor,
the rank reports `StartupFailed`, and the server exits 1 with it: never a fallback to disk.
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ckpt_engine.progress import Progress
from workers.errors import (
    ManifestMismatchError,
    RemoteInstanceError,
    TransferError,
    WorkersError,
)
from workers.model_loader import LoadFormat, WeightAccounting
from workers.remote_instance.backend import close_later, get_backend
from workers.remote_instance.manifest import Manifest, build_manifest
from workers.remote_instance.plan import SHARD, SLICE, fork_mode, pair_group_name
from workers.remote_instance.seed_client import SeedClient
from workers.remote_instance.settings import (
    LOAD_FORMAT,
    MODELEXPRESS,
    TRANSFER_ENGINE,
    RemoteInstanceSettings,
)
from workers.remote_instance.slice_client import receive_slices, slice_plan

logger = logging.getLogger(__name__)

TOKEN_BYTES = 16  # hex characters of the client token
ONE_SIDED = (TRANSFER_ENGINE, MODELEXPRESS)


class RemoteInstanceFormat(LoadFormat):
    name = LOAD_FORMAT

    def __init__(self, settings: RemoteInstanceSettings, *, slices: bool = True) -> None:
        self.settings = settings
        # slice mode where the seed offers it (a reference seed; not with a vLLM client,
        # whose parameters are vLLM's own, nor with --...-whole-tensors)
        self.slices = slices and not settings.whole_tensors
        self.seed = (
            None
            if settings.seed_ip is None  # modelexpress: the registry names it
            else _seed_client(settings)
        )
        self.weight_version: str | None = None  # the seed's, as its send reported it (rank 0)
        self.stats: dict[str, Any] = {}

    @classmethod
    def from_server_args(cls, args) -> RemoteInstanceFormat:
        return cls(RemoteInstanceSettings.from_server_args(args))

    def weights(self, path: Path):
        raise NotImplementedError("remote-instance weights are received by load() directly")

    def load(self, model, model_path, *, write=None) -> None:
        if self.settings.backend in ONE_SIDED:
            self._load_one_sided(model)
            return
        tp, s = model.tp, self.settings
        device = next(model.parameters()).device
        seed = self.seed.manifest()
        if problems := seed.mismatches(build_manifest(model)):
            raise ManifestMismatchError(problems, self.seed.url)
        plans, request = slice_plan(model, seed) if self.slices else (None, None)
        mode = fork_mode(seed.tp_size, tp.size, slices=plans is not None)
        base = "send_weights_" + _shared_token(tp, device)
        port = s.ports[tp.rank]
        name = pair_group_name(base, port, tp.rank)

        def connect():
            return get_backend(s.backend).connect(
                master_address=s.seed_ip,
                port=port,
                group_rank=1,
                group_name=name,
                timeout=s.timeout,
                device=device,
            )

        def init():
            if request is None:
                self.seed.init_group(ports=s.ports, group_name=base, backend=s.backend)
            else:
                self.seed.init_group(
                    ports=s.ports, group_name=base, backend=s.backend, slices=request.to_json()
                )

        group = _together(device, connect, init if tp.rank == 0 else None, s.timeout)[0]
        start = time.perf_counter()
        landed = start
        try:

            def receive():
                nonlocal landed
                if mode == SLICE:
                    received = receive_slices(
                        model, group, seed, plans, device, where=self.seed.url
                    )
                else:
                    received = self._receive(model, group, seed, mode, device, write)
                landed = time.perf_counter()  # every byte is here (flushed)
                # Leave the group as soon as every byte is here, without waiting for the seed's
                # answer (holding our end open until then could make both ends wait on each
                # other), and off this thread (the teardown takes ~0.5 s with NCCL).
                close_later([group], device)
                return received

            def send():  # the seed answers once it has sent everything
                return self.seed.send(ports=s.ports, group_name=base, read_timeout=24 * 3600)

            received, reply = _together(device, receive, send if tp.rank == 0 else None, s.timeout)
        except BaseException:
            group.close()  # abort now (if `receive` handed it to close_later, one of them does)
            raise
        seconds, confirmed = landed - start, time.perf_counter() - start
        hook = getattr(model, "process_weights_after_loading", None)
        if hook is not None:
            hook()
        if reply is not None:
            self.weight_version = reply.get("weight_version", seed.weight_version)
        self.stats = {"mode": mode, "bytes": received, "seconds": seconds, "confirmed": confirmed}
        logger.info(
            "rank %d: forked %.3f GB from %s in %.3f s (%.1f GB/s, %s mode; from the send call "
            "to the last byte); the seed's answer in after %.3f s; %d bytes received",
            tp.rank,
            received / 1e9,
            self.seed.url,
            seconds,
            received / 1e9 / max(seconds, 1e-9),
            mode,
            confirmed,
            received,
        )
        if s.verify:
            self._verify(model)

    def _load_one_sided(self, model) -> None:
        """transfer_engine / modelexpress: read every parameter one-sided (the seed takes no
        part), then post-load processing once."""
        from ckpt_engine.p2p.service import local_address
        from workers.remote_instance import transfer_engine
        from workers.remote_instance.coordination import RegistrySeeds

        s = self.settings
        if s.backend == MODELEXPRESS:
            seeds = RegistrySeeds(model, s)
        else:
            seeds = transfer_engine.OneSeed(self.seed)
        stats = transfer_engine.fork_one_sided(
            model, seeds, host_of=lambda seed: local_address(seed.ip), timeout=s.timeout
        )
        self.seed = SeedClient.from_url(stats["url"], s.api_key, s.timeout)
        model.process_weights_after_loading()
        self.weight_version = stats["weight_version"]
        self.stats = {"mode": s.backend, **stats}
        logger.info(
            "rank %d: forked %.3f GB one-sided (%s) from %s (TP %d) in %.3f s (%.2f GB/s, "
            "attempt %d)",
            model.tp.rank,
            stats["bytes"] / 1e9,
            s.backend,
            stats["seed"],
            stats["seed_tp"],
            stats["seconds"],
            stats["bytes"] / 1e9 / max(stats["seconds"], 1e-9),
            stats["attempts"],
        )
        if s.verify:
            self._verify(model)

    def _receive(self, model, group, seed: Manifest, mode: str, device, write) -> int:
        received = 0
        if mode == SHARD:
            params = dict(model.named_parameters())
            specs = seed.parameters
        else:
            write = model.load_weights if write is None else write
            accounting = WeightAccounting(model.checkpoint_names(), f"seed {self.seed.url}")
            specs = seed.tensors
        total = sum(params[s.name].nbytes if mode == SHARD else _nbytes(s) for s in specs)
        progress = Progress(f"fork from {self.seed.url}", total, rank=model.tp.rank)
        for k, spec in enumerate(specs):
            try:
                if mode == SHARD:
                    target = params[spec.name].data
                    group.recv(target)
                else:
                    target = torch.empty(
                        spec.shape, dtype=getattr(torch, spec.dtype), device=device
                    )
                    group.recv(target)
                    accounting.add(write([(spec.name, target)]))
                received += target.nbytes
                progress.advance(target.nbytes)
            except (TransferError, RuntimeError) as e:
                progress.close()
                raise RemoteInstanceError(
                    f"fork from seed {self.seed.url} broke at {spec.name} ({k + 1} of "
                    f"{len(specs)}) on port {group.name}: {e}"
                ) from e
        progress.close()
        try:
            group.flush()
        except (TransferError, RuntimeError) as e:
            raise RemoteInstanceError(f"fork from seed {self.seed.url}: {e}") from e
        if mode != SHARD:
            accounting.finish()
        return received

    def _verify(self, model) -> None:
        """Compare every tensor's sha256 with the seed's /weights_info (collective)."""
        from workers.models.weights import tensor_digest

        mine = {}
        for name, tensor in model.checkpoint_tensors():
            if model.tp.rank == 0:
                mine[name] = tensor_digest(tensor)
        if model.tp.rank != 0:
            return
        theirs = self.seed.weights_info()
        bad = sorted(
            n for n in set(mine) | set(theirs["tensors"]) if mine.get(n) != theirs["tensors"].get(n)
        )
        if bad:
            raise RemoteInstanceError(
                f"forked weights differ from seed {self.seed.url}'s (weight version "
                f"{theirs.get('weight_version')}): {len(bad)} tensor(s): {', '.join(bad[:20])}"
            )
        logger.info("rank 0: every tensor's sha256 matches the seed's")


def _nbytes(spec) -> int:
    """Bytes of a manifest tensor (full mode receives whole tensors)."""
    return math.prod(spec.shape) * getattr(torch, spec.dtype).itemsize


def _seed_client(settings: RemoteInstanceSettings):
    """The seed's HTTP calls: a reference server's routes, or a vLLM seed's `/collective_rpc`
    methods (`workers.vllm.seed`, which imports no vLLM)."""
    args = (settings.seed_ip, settings.seed_port, settings.api_key, settings.timeout)
    if settings.seed_api == "vllm":
        from workers.vllm.seed import VllmSeedClient

        return VllmSeedClient(*args)
    return SeedClient(*args)


def _shared_token(tp, device: torch.device) -> str:
    """A random token drawn on rank 0, the same on every rank of the client's TP group."""
    token = secrets.token_hex(TOKEN_BYTES // 2).encode()
    mine = torch.frombuffer(bytearray(token), dtype=torch.uint8).to(device)
    return bytes(tp.all_gather_list(mine)[0].cpu().tolist()).decode()


def _together(device, main: Callable, side: Callable | None, timeout: float) -> list:
    """Run `main` and `side` (if any) at once, each in a thread, and return both results; the
    first exception either raises ends the wait (the other thread is abandoned: a daemon,
    ended with the process). Each bounds its own steps; once `main` has returned, `side` gets
    `timeout` more seconds to answer."""
    jobs = [main] if side is None else [main, side]
    results: list[Any] = [None, None]
    done: queue.Queue = queue.Queue()

    def run(i: int, fn: Callable) -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            results[i] = fn()
            done.put((i, None))
        except BaseException as e:
            done.put((i, e))

    for i, fn in enumerate(jobs):
        threading.Thread(target=run, args=(i, fn), daemon=True, name=f"fork-{i}").start()
    finished: set[int] = set()
    while len(finished) < len(jobs):
        try:
            i, error = done.get(timeout=timeout if 0 in finished else None)
        except queue.Empty:
            raise RemoteInstanceError(
                f"the seed did not confirm within {timeout:.0f} s after the transfer"
            ) from None
        if error is not None:
            if isinstance(error, WorkersError):
                raise error
            raise RemoteInstanceError(f"{type(error).__name__}: {error}") from error
        finished.add(i)
    return results
