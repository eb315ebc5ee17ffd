"""Every environment variable ckpt_engine reads, in one place.

Explicit arguments always win over the environment: callers write
``x if x is not None else env_value`` (never ``x or env``, which would drop an explicit 0).

torchrun's variables: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
Our own knobs (all optional):

- CKPT_ENGINE_DEVICE: ``cpu`` or ``cuda``; default: ``cuda`` when a GPU is visible, else ``cpu``.
- CKPT_ENGINE_HOSTNAME: host part of ``CPU-<host>-<index>`` device keys (default: the hostname).
- CKPT_ENGINE_SHM_DIR: where shared-memory files live (default ``/dev/shm``).
- CKPT_ENGINE_SOCKET_DIR: parent directory of the private socket directory (default: the system
  temp dir); ``@`` selects Linux abstract socket names instead of files.
- CKPT_ENGINE_BUCKET_BYTES: default bucket size of an update.
- CKPT_ENGINE_TIMEOUT_S: default timeout of one wait during an update.
- CKPT_ENGINE_READ_THREADS: threads reading checkpoint files.
- CKPT_ENGINE_HOST_POOL_BYTES: bytes of host buffers a rank keeps for its next registration
  (``PSConfig.host_pool_bytes``; 0 turns the pool off).
- CKPT_ENGINE_MAX_MESSAGE_BYTES: size cap of one wire message (both sides).
- CKPT_ENGINE_WORKER_TIMEOUT_S: how long a worker waits for the parameter server's first message.
- CKPT_ENGINE_WIRE: default wire of ``update_weights_from_ipc`` (the inference side, which cannot
  pass arguments through an engine): ``ckpt-engine`` (default) or ``upstream`` (opt-in, unsafe
  against local attackers; see ckpt_engine.compat).
- CKPT_ENGINE_P2P_SERVE: ``0`` stops ranks from serving their checkpoints to P2P readers.
- CKPT_ENGINE_P2P_TRANSPORT: P2P transport (``auto``, ``tcp``, ``mooncake``).
- CKPT_ENGINE_P2P_HOST: address P2P servers bind to and publish (default: this host's address
  towards MASTER_ADDR).
- CKPT_ENGINE_MOONCAKE: ``1`` lets ``auto`` choose Mooncake (where an RDMA device is present): the
  operator states the fabric is trusted (Mooncake has no authentication). Default ``0``: ``auto``
  never picks Mooncake; naming it (``mooncake``, ``transfer_engine``) still works.
- CKPT_ENGINE_MOONCAKE_PROTOCOL / CKPT_ENGINE_MOONCAKE_DEVICE: Mooncake's protocol (``rdma``,
  ``tcp``, ``nvlink``; default ``rdma`` where an RDMA device is present, else ``tcp``) and RDMA
  device names (default: Mooncake's auto-discovery).
- CKPT_ENGINE_RDMA_DEVICES_DIR: where RDMA devices are listed (default ``/sys/class/infiniband``).
- CKPT_ENGINE_PROGRESS: progress of long work on rank 0 (ckpt_engine.progress): ``auto``
  (default: a tqdm bar when stderr is a terminal, else log lines), ``bar``, ``log``, ``off``.
- CKPT_ENGINE_PROGRESS_INTERVAL_S: seconds between two progress log lines (default 10).
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass


def _get(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def _int(name: str) -> int | None:
    value = _get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def _float(name: str) -> float | None:
    value = _get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not a number") from e


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    """Where this process sits in the job: torchrun's variables, or explicit overrides."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int | None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size})")
        if self.local_rank < 0 or self.local_world_size < 1:
            raise ValueError(
                f"bad local rank {self.local_rank} / local world size {self.local_world_size}"
            )
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"master_port {self.master_port} is not a TCP port")


def dist_env(
    *,
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
    local_world_size: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> DistEnv:
    """torchrun's environment with explicit arguments taking precedence.

    Without torchrun and without arguments this is a single process: rank 0 of 1.
    """
    env_rank = _int("RANK")
    rank = rank if rank is not None else (env_rank if env_rank is not None else 0)
    env_world = _int("WORLD_SIZE")
    world_size = world_size if world_size is not None else (env_world if env_world else 1)
    env_local = _int("LOCAL_RANK")
    local_rank = (
        local_rank if local_rank is not None else (env_local if env_local is not None else rank)
    )
    env_lws = _int("LOCAL_WORLD_SIZE")
    local_world_size = (
        local_world_size if local_world_size is not None else (env_lws if env_lws else world_size)
    )
    env_addr = _get("MASTER_ADDR")
    master_addr = master_addr if master_addr is not None else (env_addr or "127.0.0.1")
    master_port = master_port if master_port is not None else _int("MASTER_PORT")
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=master_addr,
        master_port=master_port,
    )


def device_type() -> str | None:
    """CKPT_ENGINE_DEVICE (``cpu`` / ``cuda``), or None to pick automatically."""
    value = _get("CKPT_ENGINE_DEVICE")
    if value is not None and value not in ("cpu", "cuda"):
        raise ValueError(f"CKPT_ENGINE_DEVICE must be 'cpu' or 'cuda', got {value!r}")
    return value


def hostname() -> str:
    return _get("CKPT_ENGINE_HOSTNAME") or socket.gethostname()


def shm_dir() -> str:
    return _get("CKPT_ENGINE_SHM_DIR") or "/dev/shm"


def socket_dir() -> str:
    """Parent of the private socket directory, or ``@`` for abstract socket names."""
    return _get("CKPT_ENGINE_SOCKET_DIR") or tempfile.gettempdir()


def bucket_bytes() -> int | None:
    return _int("CKPT_ENGINE_BUCKET_BYTES")


def timeout_s() -> float | None:
    return _float("CKPT_ENGINE_TIMEOUT_S")


def read_threads() -> int | None:
    return _int("CKPT_ENGINE_READ_THREADS")


def host_pool_bytes() -> int | None:
    return _int("CKPT_ENGINE_HOST_POOL_BYTES")


def max_message_bytes() -> int | None:
    return _int("CKPT_ENGINE_MAX_MESSAGE_BYTES")


def worker_timeout_s() -> float | None:
    return _float("CKPT_ENGINE_WORKER_TIMEOUT_S")


def resolve_worker_timeout_s(explicit: float | None, default: float) -> float:
    """``explicit``, else CKPT_ENGINE_WORKER_TIMEOUT_S, else ``default`` (the variable is read,
    and checked, either way)."""
    from_env = worker_timeout_s()
    if explicit is not None:
        return explicit
    return from_env if from_env is not None else default


def wire() -> str | None:
    return _get("CKPT_ENGINE_WIRE")


def p2p_serve() -> bool | None:
    value = _get("CKPT_ENGINE_P2P_SERVE")
    if value is None:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"CKPT_ENGINE_P2P_SERVE must be 0 or 1, got {value!r}")
    return value == "1"


def p2p_shards() -> bool | None:
    value = _get("CKPT_ENGINE_P2P_SHARDS")
    if value is None:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"CKPT_ENGINE_P2P_SHARDS must be 0 or 1, got {value!r}")
    return value == "1"


def p2p_transport() -> str | None:
    return _get("CKPT_ENGINE_P2P_TRANSPORT")


def p2p_host() -> str | None:
    return _get("CKPT_ENGINE_P2P_HOST")


def mooncake_enabled() -> bool:
    value = _get("CKPT_ENGINE_MOONCAKE")
    if value not in (None, "0", "1"):
        raise ValueError(f"CKPT_ENGINE_MOONCAKE must be 0 or 1, got {value!r}")
    return value == "1"


def rdma_devices_dir() -> str:
    return _get("CKPT_ENGINE_RDMA_DEVICES_DIR") or "/sys/class/infiniband"


def mooncake_protocol() -> str | None:
    return _get("CKPT_ENGINE_MOONCAKE_PROTOCOL")


def mooncake_device() -> str | None:
    return _get("CKPT_ENGINE_MOONCAKE_DEVICE")


def progress_mode() -> str | None:
    return _get("CKPT_ENGINE_PROGRESS")


def progress_interval_s() -> float | None:
    return _float("CKPT_ENGINE_PROGRESS_INTERVAL_S")
