"""Configuration of a ParameterServer: one frozen, keyword-only record, validated on creation.

Defaults come from the environment (see ckpt_engine.env) when set, else from the constants here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ckpt_engine import env, wire

GiB = 1 << 30
HOST_MEMORY_KINDS = ("shm", "anonymous")
P2P_TRANSPORTS = ("auto", "mooncake", "tcp")  # ckpt_engine.p2p.transport.TRANSPORTS + auto


def _env_or(value, default):
    return value if value is not None else default


@dataclass(frozen=True, kw_only=True)
class PSConfig:
    """Knobs of the parameter server.

    - bucket_bytes: target size of one bucket (one IPC slot); a single tensor larger than this
      gets a bucket of its own and the slots grow to hold it.
    - step_bucket_bytes: the bucket size of ``register_and_update`` (a training step: each
      bucket moves host-to-device as soon as its bytes are read), if below bucket_bytes. Measured on 1x H200
      (bench/RESULTS.md, training steps), 64 MiB against 512 MiB: Llama-3-8B's 16.06 GB
      0.394-0.430 s a step against 0.432-0.458 s; the 17.37 GB dense workload 0.48-0.51 s
      against 0.53-0.54 s.
    - num_slots: slots in the IPC buffer; bucket k uses slot k % num_slots. Up to num_slots
      buckets are in flight (host-to-device, broadcast) while the worker consumes an earlier
      one, so the copy engine never waits for the worker's Ack. Device memory held during an
      update: num_slots * bucket_bytes (default 3 x 512 MiB = 1.5 GiB), all freed after it.
    - timeout_s: default limit of any single wait of an update (a worker's reply, a collective).
    - device_memory_fraction: share of the free device memory (min over ranks) the IPC buffer
      may take; buckets shrink to fit.
    - host_memory: where registered bytes live when they are copied (files outside the shm
      directory, named tensors): ``anonymous`` (default: private memory with transparent huge
      pages, which pins about twice as fast as 4 KiB pages, and needs no room in a container's
      often small /dev/shm) or ``shm`` (files in the shm directory, visible to operators there).
    - pin_in_place: map checkpoint files that already live in the shm directory instead of
      copying them (they must not change while registered).
    - read_threads: threads reading checkpoint files.
    - host_pool_bytes: bytes of host buffers kept after an unregister for the next register
      (ckpt_engine.pool: a new checkpoint of the same shapes reuses mapped, pinned memory);
      buffers handed back past this bound are freed at once; 0 turns the pool off. Default
      64 GiB per rank (it only ever holds what was registered before).
    - connect_poll_s: while waiting for workers to connect, ranks compare notes this often, so a
      failure on one rank (e.g. req_func raising) ends the wait everywhere.
    - max_message_bytes: size cap of one wire message.
    - init_timeout_s: timeout of torch.distributed initialization and of the process groups.
    - p2p_serve: serve registered checkpoints to P2P readers (ckpt_engine.p2p) from the first
      ``gather_metas`` / ``local_metas`` of a checkpoint until it is unregistered.
    - p2p_transport: ``auto`` (Mooncake where the operator allows it, CKPT_ENGINE_MOONCAKE=1,
      and an RDMA device is present; else ``tcp``) or a transport name (``mooncake`` runs over
      RDMA or TCP); an explicit one that cannot run here is an error.
    - p2p_host: address P2P servers bind to and publish; default: this host's address towards
      MASTER_ADDR (127.0.0.1 on a single host).
    - p2p_shards: a P2P receiver whose worker reports the rows it keeps (every receiver's must)
      reads only those rows from the owners, each receiver every bucket, no broadcast
      (``ps/p2p.py``); off: one receiver reads each bucket whole and broadcasts it.
    """

    bucket_bytes: int = field(default_factory=lambda: _env_or(env.bucket_bytes(), GiB // 2))
    step_bucket_bytes: int = 64 << 20
    num_slots: int = 3
    timeout_s: float = field(default_factory=lambda: _env_or(env.timeout_s(), 300.0))
    device_memory_fraction: float = 0.5
    host_memory: str = "anonymous"
    pin_in_place: bool = True
    read_threads: int = field(
        default_factory=lambda: _env_or(env.read_threads(), min(16, os.cpu_count() or 1))
    )
    host_pool_bytes: int = field(default_factory=lambda: _env_or(env.host_pool_bytes(), 64 * GiB))
    connect_poll_s: float = 0.5
    max_message_bytes: int = field(
        default_factory=lambda: _env_or(env.max_message_bytes(), wire.DEFAULT_MAX_MESSAGE_BYTES)
    )
    init_timeout_s: float = 1800.0
    p2p_serve: bool = field(default_factory=lambda: _env_or(env.p2p_serve(), True))
    p2p_transport: str = field(default_factory=lambda: _env_or(env.p2p_transport(), "auto"))
    p2p_host: str | None = field(default_factory=env.p2p_host)
    p2p_shards: bool = field(default_factory=lambda: _env_or(env.p2p_shards(), True))

    def __post_init__(self) -> None:
        for name in ("bucket_bytes", "step_bucket_bytes"):
            if getattr(self, name) < 4096:
                raise ValueError(f"{name} must be >= 4096, got {getattr(self, name)}")
        if self.num_slots < 2:
            raise ValueError(f"num_slots must be >= 2, got {self.num_slots}")
        for name in ("timeout_s", "connect_poll_s", "init_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.device_memory_fraction <= 1:
            raise ValueError(
                f"device_memory_fraction must be in (0, 1], got {self.device_memory_fraction}"
            )
        if self.host_memory not in HOST_MEMORY_KINDS:
            raise ValueError(
                f"host_memory must be one of {', '.join(HOST_MEMORY_KINDS)}, got {self.host_memory!r}"
            )
        if self.host_pool_bytes < 0:
            raise ValueError(f"host_pool_bytes must be >= 0, got {self.host_pool_bytes}")
        if self.read_threads < 1:
            raise ValueError(f"read_threads must be >= 1, got {self.read_threads}")
        if self.p2p_transport not in P2P_TRANSPORTS:
            raise ValueError(
                f"p2p_transport must be one of {', '.join(P2P_TRANSPORTS)}, got {self.p2p_transport!r}"
            )
        if self.max_message_bytes < 4096:
            raise ValueError(f"max_message_bytes must be >= 4096, got {self.max_message_bytes}")
