"""The Mooncake P2P transport (optional): ``mooncake-transfer-engine`` one-sided reads.

Not a dependency: ``mooncake.engine`` is imported lazily, and when it is missing or its engine
does not initialize (no libibverbs), ``unavailable()`` says why. One TransferEngine per process
(P2P handshake mode, no metadata server; ``engine()``, shared with the fork's ``transfer_engine``
backend), bound to the P2P host, protocol CKPT_ENGINE_MOONCAKE_PROTOCOL, else ``rdma`` where an
RDMA device is present, else ``tcp``.

``auto`` picks Mooncake only where it pays and the operator allowed it (``auto_unavailable``):
CKPT_ENGINE_MOONCAKE=1 and an RDMA device present. Over TCP it is no faster than the ``tcp``
transport and checks no token, so ``auto`` stays on ``tcp`` there; naming ``mooncake`` still
runs it over TCP.

Owner: registers each host buffer with the engine; the endpoint record carries the engine's
session (``host:rpc_port``) and each buffer's address and size. Reader: registers its staging
buffers, then ``batch_transfer_sync_read`` pulls each range (a column shard run by run, or its
whole span in one piece where runs are shorter than ``MIN_RUN_BYTES``); a nonzero status names
the owner.

Trust: Mooncake has no authentication; any process that reaches the session port can read the
registered memory, and write into it (Mooncake checks only that a remote address lies inside a
registered buffer). The checkpoint token in the metas is not checked on this path, so serve over
Mooncake only on a trusted fabric; it is off unless named or allowed (CKPT_ENGINE_MOONCAKE=1).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from ckpt_engine import env
from ckpt_engine.errors import TransferError
from ckpt_engine.host_memory import HostBuffer
from ckpt_engine.p2p.transport import OwnerServer, Reader, ReadRange, Transport

# Ranges per batch read: Mooncake's TCP transport failed (EFAULT) on one batch of ~2.2k ranges
# (workers/remote_instance/transfer_engine.py); 1024 keeps a margin.
BATCH_RANGES = 1024
# A column shard (a strided range) whose runs are shorter is read as its whole span, one piece
# (at most the whole tensor, what was read before receivers reported their rows). Per run, the
# reader builds three list entries (0.2 us a run on the 2-core CI machine: 2.5 s for the 12.6M
# runs of 768 B of an MoE's down_proj experts per rank, Qwen3-30B-A3B at TP=2) and Mooncake
# makes one transfer (not measured on RDMA; taken as about as much): about 0.5 us, the time
# 25 KB take at 50 GB/s (one 400G NIC). A run is read alone when skipping the gap after it (at
# TP=2 as long as the run) saves more than that: from 32 KiB.
MIN_RUN_BYTES = 32 << 10
logger = logging.getLogger(__name__)


def rdma_devices() -> list[str]:
    """The RDMA devices this host lists (``/sys/class/infiniband``; empty where none)."""
    try:
        return sorted(os.listdir(env.rdma_devices_dir()))
    except OSError:
        return []


def default_protocol() -> str:
    """CKPT_ENGINE_MOONCAKE_PROTOCOL, else ``rdma`` where an RDMA device is present, else ``tcp``."""
    explicit = env.mooncake_protocol()
    if explicit is not None:
        return explicit
    return "rdma" if rdma_devices() else "tcp"


class MooncakeTransport(Transport):
    name = "mooncake"
    _shared: MooncakeTransport | None = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> MooncakeTransport:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def __init__(self) -> None:
        self._protocol: str | None = None  # fixed when the engine starts
        self.device = env.mooncake_device() or ""
        self._engine: Any = None
        self._host: str | None = None
        self._why: str | None = None
        self._registered: set[int] = set()
        self._lock = threading.Lock()
        try:
            import mooncake.engine  # noqa: F401
        except Exception as e:  # ImportError, or a missing shared library
            self._why = f"mooncake.engine does not import ({type(e).__name__}: {e})"

    @property
    def protocol(self) -> str:
        return self._protocol if self._protocol is not None else default_protocol()

    def unavailable(self) -> str | None:
        return self._why

    def auto_unavailable(self) -> str | None:
        if self._why is not None:
            return self._why
        if not env.mooncake_enabled():
            return "off unless the operator allows it (CKPT_ENGINE_MOONCAKE=1: no authentication)"
        if self.protocol != "rdma" or not rdma_devices():
            return (
                f"no RDMA device here ({env.rdma_devices_dir()}; protocol {self.protocol}): "
                "over TCP the tcp transport is as fast and checks tokens"
            )
        return None

    def engine(self, host: str) -> Any:
        """The process's engine, initialized on first use (TransferError if it cannot be)."""
        with self._lock:
            if self._engine is not None:
                return self._engine
            if self._why is not None:
                raise TransferError(f"mooncake transport unavailable: {self._why}")
            from mooncake.engine import TransferEngine

            engine = TransferEngine()
            protocol = self.protocol
            code = engine.initialize(host, "P2PHANDSHAKE", protocol, self.device)
            if code != 0:
                self._why = f"TransferEngine.initialize({host}, {protocol}) returned {code}"
                raise TransferError(f"mooncake transport unavailable: {self._why}")
            self._engine, self._host, self._protocol = engine, host, protocol
            logger.info("mooncake transfer engine on %s (%s)", self.session(), protocol)
            return engine

    def session(self) -> str:
        return f"{self._host}:{self._engine.get_rpc_port()}"

    def register(self, buffers: Sequence[HostBuffer]) -> None:
        for b in buffers:
            ptr = b.tensor.data_ptr()
            if b.nbytes and ptr not in self._registered:
                code = self._engine.register_memory(ptr, b.nbytes)
                if code != 0:
                    raise TransferError(f"mooncake register_memory of {b.nbytes} bytes: {code}")
                self._registered.add(ptr)

    def unregister(self, ptrs: Sequence[int]) -> None:
        for ptr in ptrs:
            if ptr in self._registered:
                self._engine.unregister_memory(ptr)
                self._registered.discard(ptr)

    def serve(self, host: str, rank: int) -> OwnerServer:
        self.engine(host)
        return MooncakeServer(self, rank)

    def reader(
        self, record: dict[str, Any], *, owner: str, checkpoint: str, timeout_s: float
    ) -> Reader:
        if self._engine is None:
            from ckpt_engine.p2p.service import local_address

            self.engine(env.p2p_host() or local_address(env.dist_env().master_addr))
        return MooncakeReader(self, record, owner=owner)


class MooncakeServer(OwnerServer):
    name = "mooncake"

    def __init__(self, transport: MooncakeTransport, rank: int) -> None:
        self.transport, self.rank = transport, rank
        self._ptrs: dict[str, list[int]] = {}

    def export(self, checkpoint: str, token: str, buffers: Sequence[HostBuffer]) -> dict[str, Any]:
        self.transport.register(buffers)
        self._ptrs[checkpoint] = [b.tensor.data_ptr() for b in buffers if b.nbytes]
        return {
            "session": self.transport.session(),
            "protocol": self.transport.protocol,
            "buffers": [b.tensor.data_ptr() if b.nbytes else 0 for b in buffers],
            "sizes": [b.nbytes for b in buffers],
        }

    def withdraw(self, checkpoint: str) -> None:
        self.transport.unregister(self._ptrs.pop(checkpoint, []))

    def close(self) -> None:
        for name in list(self._ptrs):
            self.withdraw(name)


class MooncakeReader(Reader):
    def __init__(self, transport: MooncakeTransport, record: dict[str, Any], *, owner: str):
        session, ptrs, sizes = record.get("session"), record.get("buffers"), record.get("sizes")
        if (
            not isinstance(session, str)
            or not isinstance(ptrs, list)
            or not isinstance(sizes, list)
        ):
            raise TransferError(f"{owner}: bad mooncake endpoint record", owner=owner)
        self.transport = transport
        self.owner = f"{owner} at mooncake://{session}"
        self.session, self.ptrs, self.sizes = session, ptrs, sizes
        self._local: list[int] = []

    def prepare(self, buffers: Sequence[HostBuffer]) -> None:
        self.transport.register(buffers)
        self._local = [b.tensor.data_ptr() for b in buffers if b.nbytes]

    def read(self, ranges: Sequence[ReadRange]) -> int:
        import ctypes

        local, remote, lengths = [], [], []
        for r in ranges:
            if r.buffer >= len(self.ptrs) or r.offset + r.span > self.sizes[r.buffer]:
                raise TransferError(
                    f"{self.owner}: range outside buffer {r.buffer}", owner=self.owner
                )
            base = ctypes.addressof((ctypes.c_char * r.span).from_buffer(r.dst))
            if r.count > 1 and r.nbytes < MIN_RUN_BYTES:  # short runs: the span, one piece
                local.append(base)
                remote.append(self.ptrs[r.buffer] + r.offset)
                lengths.append(r.span)
                continue
            for offset, at in r.runs():  # a column shard: one range per run, one-sided
                local.append(base + at)
                remote.append(self.ptrs[r.buffer] + offset)
                lengths.append(r.nbytes)
        for i in range(0, len(lengths), BATCH_RANGES):
            batch = slice(i, i + BATCH_RANGES)
            code = self.transport._engine.batch_transfer_sync_read(
                self.session, local[batch], remote[batch], lengths[batch]
            )
            if code != 0:
                raise TransferError(
                    f"mooncake read of {sum(lengths[batch])} bytes from {self.owner} failed "
                    f"(status {code})",
                    owner=self.owner,
                )
        return sum(lengths)

    def close(self) -> None:
        self.transport.unregister(self._local)
        self._local = []
