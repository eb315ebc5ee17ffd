"""Memory for the `transfer_engine` backend (Mooncake), seed and client alike: this process's
engine (`mooncake_engine`), its parameters' memory as regions to register (`regions`: adjacent
parameters merged into one region, never across two CUDA allocations, which an RDMA
registration must not span), and the registration that follows them (`Registration.ensure`:
exactly the regions wanted, registered again when the storage moved).
"""

from __future__ import annotations

import bisect
import logging
import threading

import torch

from workers.errors import WorkersError

logger = logging.getLogger(__name__)


def mooncake_engine(host: str):
    """This process's Mooncake transport and its engine at `host` (one per process,
    `ckpt_engine.p2p.mooncake`); WorkersError when Mooncake is missing or fails to start."""
    from ckpt_engine.errors import TransferError as P2PTransferError
    from ckpt_engine.p2p.mooncake import MooncakeTransport

    transport = MooncakeTransport.shared()
    if (why := transport.unavailable()) is not None:
        raise WorkersError(f"the transfer_engine backend needs Mooncake: {why}")
    try:
        return transport, transport.engine(host)
    except P2PTransferError as e:
        raise WorkersError(f"the transfer_engine backend: {e}") from e


def regions(
    params: dict[str, torch.Tensor], segments: list[tuple[int, int]] | None = None
) -> list[tuple[int, int]]:
    """(address, bytes) of the parameters' memory, adjacent ones merged (pure). With `segments`
    (the allocator's (start, bytes) blocks, on CUDA), a region never spans two of them: an RDMA
    registration must lie inside one allocation."""
    starts = sorted(segments or [])

    def segment_of(ptr: int) -> int:
        i = bisect.bisect_right(starts, (ptr, float("inf"))) - 1
        return i if i >= 0 and ptr < starts[i][0] + starts[i][1] else -1

    spans = sorted((t.data_ptr(), t.numel() * t.element_size()) for t in params.values())
    out: list[tuple[int, int]] = []
    last_segment = None
    for ptr, n in spans:
        if n == 0:
            continue
        seg = segment_of(ptr) if starts else None
        if out and out[-1][0] + out[-1][1] >= ptr and seg == last_segment:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][1], ptr + n - start))
        else:
            out.append((ptr, n))
        last_segment = seg
    return out


def cuda_segments(device: torch.device) -> list[tuple[int, int]] | None:
    """The CUDA caching allocator's segments on `device` (None off CUDA)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return [
            (seg["address"], seg["total_size"])
            for seg in torch.cuda.memory_snapshot()
            if seg.get("device") == index
        ]
    except (RuntimeError, KeyError, TypeError) as e:  # then regions merge across segments
        logger.warning("no CUDA allocator snapshot (%s): regions may span segments", e)
        return None


def param_regions(params: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    device = next(iter(params.values())).device if params else torch.device("cpu")
    return regions(params, cuda_segments(device))


class Registration:
    """Memory regions registered with this process's engine, replaced when they change."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.regions: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def ensure(self, wanted: list[tuple[int, int]]) -> bool:
        """Register exactly `wanted`; True if anything changed."""
        with self._lock:
            if wanted == self.regions:
                return False
            self._drop()
            for ptr, n in wanted:
                code = self.engine.register_memory(ptr, n)
                if code != 0:
                    self._drop()
                    raise WorkersError(f"Mooncake register_memory({n} bytes) returned {code}")
                self.regions.append((ptr, n))
            return True

    def _drop(self) -> None:
        for ptr, _ in self.regions:
            self.engine.unregister_memory(ptr)
        self.regions = []

    def close(self) -> None:
        with self._lock:
            self._drop()
