"""ParameterServer: one per torchrun rank. A thin orchestrator over the registry (host memory),
the metas (who holds what), and the update driver (ps.broadcast).

Rank, world size and rendezvous come from torchrun's environment unless given as arguments. The
device index is LOCAL_RANK (one GPU per rank; 0 when a single GPU is visible), so nothing
assumes that all ranks share a host. torch.distributed is initialized at the first collective
(gather_metas / update) unless the caller already did: gloo on CPU, ``cpu:gloo,cuda:nccl`` on GPU.
Control traffic and metadata use a separate gloo group with deadlines (ps.groups).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta

import torch

from ckpt_engine import device, env, leases
from ckpt_engine.bulk import without_gc
from ckpt_engine.channel import SocketDir
from ckpt_engine.compat import check_wire, warn_upstream
from ckpt_engine.errors import MetasError
from ckpt_engine.metas import CheckpointMetas, RankMetas, rank_metas_from_json
from ckpt_engine.pool import HostPool
from ckpt_engine.ps.broadcast import BroadcastUpdate
from ckpt_engine.ps.config import PSConfig
from ckpt_engine.ps.context import UpdateContext
from ckpt_engine.ps.groups import ProcessGroups, check_ranks
from ckpt_engine.ps.registry import RegisteredCheckpoint, Registry

logger = logging.getLogger(__name__)

ReqFunc = Callable[[list[tuple[str, str]]], object]


class ParameterServer:
    """Holds checkpoints in host memory and pushes them into colocated inference workers."""

    def __init__(
        self,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        local_rank: int | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        device_type: str | None = None,
        config: PSConfig | None = None,
    ) -> None:
        self.env = env.dist_env(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            master_addr=master_addr,
            master_port=master_port,
        )
        self.config = config if config is not None else PSConfig()
        self.device_type = device.resolve_device_type(device_type)
        self.device_index = device.index_for(self.device_type, self.env.local_rank)
        if self.device_type == "cuda":
            torch.cuda.set_device(self.device_index)
        self.device_key = device.device_key(self.device_index, device_type=self.device_type)
        self.run_id = secrets.token_hex(4)
        leases.sweep(env.shm_dir(), env.socket_dir())  # what dead runs left on this host
        self._lease = leases.RunLease.acquire(
            self.run_id, shm_dir=env.shm_dir(), socket_dir=env.socket_dir()
        )
        self._registry = Registry(
            host_memory_kind=self.config.host_memory,
            shm_dir=env.shm_dir(),
            pin=self.device_type == "cuda",
            pin_in_place=self.config.pin_in_place,
            read_threads=self.config.read_threads,
            label=f"{self.run_id}-r{self.rank}",
            pool_bytes=self.config.host_pool_bytes,
            rank=self.rank,
            device=torch.device(self.device_type, self.device_index)
            if self.device_type == "cuda"
            else torch.device("cpu"),
        )
        self._metas: dict[str, CheckpointMetas] = {}
        self._plans: dict = {}  # the last plan per checkpoint (ps.context.choose_plan)
        self._socket_dir = SocketDir(env.socket_dir(), self.run_id)
        self._groups = ProcessGroups(
            self.env, device_type=self.device_type, timeout_s=self.config.init_timeout_s
        )
        self._updates = 0
        self.last_update_timings: dict[str, float | int] = {}  # phases of the last broadcast
        # phases of the last register_and_update, seconds: register (headers, buffers), gather,
        # update, wait_reads (after it, for the reads and the named host copy), reads (first to
        # last chunk), mover_waited (for bytes), host_copy (named tensors read in place)
        self.last_step_timings: dict[str, float] = {}
        # whether the last register_and_update reached its update: a failure before it sent no
        # worker anything (the updater then resumes a paused vLLM)
        self.last_step_reached_update = False
        self._p2p = None  # ckpt_engine.p2p.service.OwnerService, started on first publication
        logger.info(
            "parameter server rank %d/%d on %s, run id %s (files ckpt-engine-%s-*)",
            self.rank,
            self.world_size,
            self.device_key,
            self.run_id,
            self.run_id,
        )

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    # -- checkpoints -----------------------------------------------------------------------------
    def register_checkpoint(
        self,
        name: str,
        *,
        files: Sequence[str | os.PathLike] | None = None,
        named_tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Load safetensors ``files`` (parallel reads; files in the shm directory are mapped in
        place) and/or in-memory ``named_tensors`` into host memory under ``name``.

        All or nothing: a bad file raises CheckpointFileError naming it and the problem, and
        nothing of the checkpoint stays registered. Local to this rank (no collective).
        """
        self._registry.register(name, files=files or (), named_tensors=named_tensors)

    def unregister_checkpoint(self, name: str) -> None:
        """Stop serving ``name`` to P2P readers, free every buffer of it, forget its metas."""
        if self._p2p is not None and name in self._registry:
            self._p2p.withdraw(name)
        self._registry.unregister(name)
        self._metas.pop(name, None)
        self._plans.pop(name, None)

    def register_and_update(
        self,
        name: str,
        req_func: ReqFunc,
        *,
        files: Sequence[str | os.PathLike] | None = None,
        named_tensors: Mapping[str, torch.Tensor] | None = None,
        timeout: float | timedelta | None = None,
        wire: str = "ckpt-engine",
    ) -> None:
        """Collective: register ``name`` and push it to every rank's worker in one pass.

        A training step's new files go to the GPUs while they are read: the buffers come from
        the host pool (ckpt_engine.pool; pinned already when the last step's checkpoint was
        the same size and has been unregistered), the reads run on the read threads
        (ckpt_engine.ps.staging), and each bucket moves host-to-device and is broadcast as soon
        as its bytes are read, so the step costs about max(read, transfer). Files are copied
        into host memory, never mapped in place (the trainer may overwrite them next step).
        Its buckets are of ``config.step_bucket_bytes`` at most. Named tensors on this rank's device
        go into the slots from where they are while their copy into the pool runs beside the
        update (ckpt_engine.ps.direct says which); others are copied into host memory first. Returns when every worker applied the update and
        the host copy is complete (serving P2P readers from the next ``gather_metas``); the
        named tensors are no longer referenced then and may change.

        Any failure (a bad or truncated file, named in the CheckpointFileError or UpdateError;
        a worker's refusal; a timeout) raises on every rank and leaves ``name`` unregistered,
        its buffers back in the pool; other checkpoints stay registered and the workers keep
        the weights of their last complete update.
        """
        if isinstance(timeout, timedelta):
            timeout = timeout.total_seconds()
        timeout_s = float(timeout) if timeout is not None else self.config.timeout_s
        error: BaseException | None = None
        self.last_step_reached_update = False
        t0 = time.perf_counter()
        try:
            self._registry.register(
                name, files=files or (), named_tensors=named_tensors, defer_reads=True
            )
        except Exception as e:  # join the gather anyway, so every rank fails the same way
            error = e
        try:
            t1 = time.perf_counter()
            self.gather_metas(name)
            if error is not None:
                raise error
            t2 = time.perf_counter()
            self.last_step_reached_update = True
            step_bucket = min(self.config.bucket_bytes, self.config.step_bucket_bytes)
            self.update(name, req_func, timeout=timeout_s, wire=wire, bucket_bytes=step_bucket)
            t3 = time.perf_counter()
            settled = self._registry.get(name).settle(time.monotonic() + timeout_s)
            self.last_step_timings = {
                "register": t1 - t0,
                "gather": t2 - t1,
                "update": t3 - t2,
                "wait_reads": time.perf_counter() - t3,
                **settled,
            }
        except BaseException as e:
            if name in self._registry:
                self.unregister_checkpoint(name)
            if error is not None and e is not error:
                raise error from e
            raise

    def registered_checkpoints(self) -> list[str]:
        return self._registry.names()

    def checkpoint(self, name: str) -> RegisteredCheckpoint:
        return self._registry.get(name)

    @property
    def host_pool(self) -> HostPool:
        """The pinned host buffers kept across registrations (ckpt_engine.pool)."""
        return self._registry.pool

    @property
    def broken(self) -> str | None:
        """Why this parameter server's control group cannot run another collective (a failed
        or timed-out one), else None: restart the ranks."""
        return self._groups.broken

    # -- metas -----------------------------------------------------------------------------------
    def local_metas(self, name: str) -> RankMetas:
        """What this rank holds of ``name``; with ``config.p2p_serve`` this starts serving it to
        P2P readers (until unregistered) and the record says how to reach it, token included;
        not while its host copy is incomplete (``register_and_update``: from the next call)."""
        ckpt = self._registry.get(name)
        publish = self.config.p2p_serve and not ckpt.pending
        return RankMetas(
            rank=self.rank,
            device_key=self.device_key,
            host=env.hostname(),
            buffer_bytes=tuple(b.nbytes for b in ckpt.buffers),
            tensors=ckpt.tensors,
            p2p=self._p2p_publish(name, ckpt) if publish else None,
        )

    def _p2p_publish(self, name: str, ckpt: RegisteredCheckpoint) -> dict:
        if self._p2p is None:
            from ckpt_engine.p2p.service import OwnerService, local_address

            host = self.config.p2p_host or local_address(self.env.master_addr)
            self._p2p = OwnerService(host=host, rank=self.rank, choice=self.config.p2p_transport)
        return self._p2p.publish(name, ckpt.buffers)

    @without_gc
    def gather_metas(self, name: str) -> CheckpointMetas:
        """Collective: every rank learns what every rank holds of ``name``."""
        control = self._groups.control()
        local = self.local_metas(name).to_json() if name in self._registry else None
        infos = control.all_gather_json(
            local, timeout_s=self.config.init_timeout_s, what=f"gather_metas({name!r})"
        )
        missing = [r for r, info in enumerate(infos) if info is None]
        if missing:
            raise MetasError(f"checkpoint {name!r} is not registered on ranks {missing}")
        metas = CheckpointMetas(name=name, ranks=tuple(rank_metas_from_json(i) for i in infos))
        self._metas[name] = metas
        return metas

    def get_metas(self, name: str) -> CheckpointMetas:
        try:
            return self._metas[name]
        except KeyError:
            raise MetasError(f"no metas for {name!r}: call gather_metas or load_metas") from None

    def load_metas(self, metas: CheckpointMetas) -> None:
        """Adopt metas gathered elsewhere (e.g. ``CheckpointMetas.load(path)``): this job's own,
        for a broadcast update (checked then), or another job's, whose ranks are the owners of
        a P2P update (``update(..., ranks=...)``)."""
        self._metas[metas.name] = metas

    # -- update ----------------------------------------------------------------------------------
    def update(
        self,
        name: str,
        req_func: ReqFunc,
        *,
        ranks: Sequence[int] | None = None,
        timeout: float | timedelta | None = None,
        wire: str = "ckpt-engine",
        bucket_bytes: int | None = None,
    ) -> None:
        """Collective: push checkpoint ``name`` into every rank's colocated worker.

        ``req_func(socket_paths)`` runs in a thread on every rank with
        ``[(device_key, zmq_address), ...]`` ordered by rank; it should make the inference side
        call ``update_weights_from_ipc`` with its address (e.g. one HTTP call per instance,
        from one rank per instance). Returns when every worker applied every bucket and ran its
        post_hook; otherwise raises UpdateError on every rank. ``timeout`` (seconds or timedelta;
        default ``config.timeout_s``) bounds each wait on a worker or on the other ranks.

        ``ranks=[...]`` (P2P, new instances joining): collective over this job, but only the
        listed ranks receive; they read each bucket straight from the host memory of its owner
        as the loaded metas describe it (``load_metas`` of a running job's saved metas: ranks
        that serve, reached through the address and token in the file; see ckpt_engine.p2p),
        spread it over themselves and hand it to their workers as in broadcast. ``req_func``
        gets the listed ranks' socket paths. The owners join no collective. The other ranks of
        this job return at once. ``ranks=None``: broadcast over all ranks of this job.

        ``wire="upstream"`` (opt-in, unsafe against local attackers: see ckpt_engine.compat)
        speaks the upstream checkpoint-engine 0.4.x wire, so workers running upstream's
        ``checkpoint_engine.worker.update_weights_from_ipc`` (SGLang, vLLM) apply the update.
        ``bucket_bytes``: this update's bucket size (default ``config.bucket_bytes``; the same
        on every rank).
        """
        config = self.config
        if bucket_bytes is not None:
            config = dataclasses.replace(config, bucket_bytes=bucket_bytes)
        check_wire(wire)
        if ranks is not None:
            ranks = check_ranks(ranks, self.world_size)
            if wire != "ckpt-engine":
                raise ValueError("P2P updates (ranks=...) speak only the ckpt-engine wire")
        if isinstance(timeout, timedelta):
            timeout = timeout.total_seconds()
        timeout_s = float(timeout) if timeout is not None else self.config.timeout_s
        if timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {timeout_s}")
        control = self._groups.control()
        data_group = self._groups.data
        rank, world_size = self.rank, self.world_size
        if ranks is not None:  # P2P: every rank of the job makes the groups; only ranks go on
            control, data_group = self._groups.subgroups(ranks)
            if self.rank not in ranks:
                return
            rank, world_size = ranks.index(self.rank), len(ranks)
        self._updates += 1
        ctx = UpdateContext(
            name=name,
            update_no=self._updates,
            run_id=self.run_id,
            rank=rank,
            world_size=world_size,
            device_type=self.device_type,
            device_index=self.device_index,
            device_key=self.device_key,
            control=control,
            data_group=data_group,
            socket_dir=self._socket_dir,
            config=config,
            timeout_s=timeout_s,
            metas=self._metas.get(name),
            checkpoint=self._registry.get(name) if name in self._registry else None,
            plan_cache=self._plans,
        )
        if ranks is not None:
            from ckpt_engine.ps.p2p import P2PUpdate

            update = P2PUpdate(
                ctx, req_func, global_ranks=ranks, transport=self.config.p2p_transport
            )
            try:
                update.run()
            finally:
                self.last_update_timings = dict(update.timings)
            return
        driver = BroadcastUpdate
        if wire == "upstream":
            from ckpt_engine.compat.ps_driver import UpstreamBroadcastUpdate

            warn_upstream("parameter server")
            driver = UpstreamBroadcastUpdate
        update = driver(ctx, req_func)
        try:
            update.run()
        finally:
            self.last_update_timings = dict(update.timings)

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop P2P serving, free every checkpoint and socket; tear down torch.distributed if
        we set it up."""
        if self._p2p is not None:
            self._p2p.close()
            self._p2p = None
        self._registry.close()
        self._metas.clear()
        self._plans.clear()
        self._socket_dir.close()
        if self._lease is not None:
            self._lease.close()
        self._groups.close()

    def __enter__(self) -> ParameterServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
