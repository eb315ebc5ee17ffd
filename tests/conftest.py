"""Shared test fixtures: the `gpu` marker, free ports, and subprocess cleanup."""

from __future__ import annotations

import socket

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    """A TCP port the OS says is free now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free port (no password), stopped after the test."""
    from redis_testutil import start_redis

    server = start_redis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()
