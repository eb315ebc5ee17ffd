"""A rank's Registry as the registry tests make it (anonymous host memory, label "t")."""

from __future__ import annotations

from ckpt_engine.ps.registry import Registry


def make_registry(
    shm_dir, *, pin: bool, pool_bytes: int = 0, pin_in_place: bool = False, read_threads: int = 2
) -> Registry:
    return Registry(
        host_memory_kind="anonymous",
        shm_dir=str(shm_dir),
        pin=pin,
        pin_in_place=pin_in_place,
        read_threads=read_threads,
        label="t",
        pool_bytes=pool_bytes,
    )
