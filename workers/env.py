"""Every environment variable the inference side reads, read once, here.

Callers take an explicit argument first and fall back to these values only when the argument is
None (`x if x is not None else ENV.x`), never `x or ENV.x`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Env:
    api_key: str | None
    """CKPT_ENGINE_API_KEY: default for `--api-key` (weight-changing endpoints need it)."""
    log_level: str
    """CKPT_ENGINE_LOG_LEVEL: default for `--log-level` (debug, info, warning, error)."""
    remote_instance_ip: str | None = None
    """REMOTE_INSTANCE_IP: the seed's address for vLLM's ``--load-format remote_instance``
    (vLLM PR #27417's name; ``--model-loader-extra-config`` ``seed_url`` takes precedence)."""
    remote_instance_server_port: str | None = None
    """REMOTE_INSTANCE_SERVER_PORT: the seed's HTTP port (with REMOTE_INSTANCE_IP)."""
    remote_instance_ports: str | None = None
    """REMOTE_INSTANCE_PORTS: one group port per client TP rank, "p0,p1" or "[p0, p1]"."""
    test_fork_delay_s: float = 0.0
    """CKPT_ENGINE_TEST_FORK_DELAY_S: tests only: seconds a seed pauses after each tensor it
    sends to a forking client (to kill it mid-transfer)."""
    test_read_delay_s: float = 0.0
    """CKPT_ENGINE_TEST_READ_DELAY_S: tests only: seconds a transfer_engine client pauses after
    reading each parameter (to kill its seed mid-transfer)."""
    test_fail_update_file: str | None = None
    """CKPT_ENGINE_TEST_FAIL_UPDATE_FILE: tests only: while this file exists, the last TP rank
    fails IPC weight updates in the bucket whose index the file holds (after earlier buckets
    were written: the fail-closed path)."""
    test_bucket_delay_file: str | None = None
    """CKPT_ENGINE_TEST_BUCKET_DELAY_FILE: tests only: while this file exists, the vLLM adapter
    logs "test delay: bucket N loaded" (a warning) and sleeps the seconds the file holds after
    each bucket it loads (to kill an updater mid-update); a vLLM fork seed pauses that long after
    each tensor it sends (to kill the seed mid-transfer)."""


def read_env(environ: dict[str, str] | None = None) -> Env:
    """Read the variables from `environ` (default: the process environment)."""
    environ = os.environ if environ is None else environ
    api_key = environ.get("CKPT_ENGINE_API_KEY")
    return Env(
        api_key=api_key if api_key else None,
        log_level=environ.get("CKPT_ENGINE_LOG_LEVEL", "info").lower(),
        remote_instance_ip=environ.get("REMOTE_INSTANCE_IP") or None,
        remote_instance_server_port=environ.get("REMOTE_INSTANCE_SERVER_PORT") or None,
        remote_instance_ports=environ.get("REMOTE_INSTANCE_PORTS") or None,
        test_fork_delay_s=float(environ.get("CKPT_ENGINE_TEST_FORK_DELAY_S", "0") or 0),
        test_read_delay_s=float(environ.get("CKPT_ENGINE_TEST_READ_DELAY_S", "0") or 0),
        test_fail_update_file=environ.get("CKPT_ENGINE_TEST_FAIL_UPDATE_FILE") or None,
        test_bucket_delay_file=environ.get("CKPT_ENGINE_TEST_BUCKET_DELAY_FILE") or None,
    )


ENV = read_env()
