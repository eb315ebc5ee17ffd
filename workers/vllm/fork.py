"""``--load-format remote_instance`` in vLLM: a new vLLM instance forks its weights from a running
seed (a vLLM instance, ``workers.vllm.seed``, or our reference server) instead of reading disk.

Registered with vLLM's ``register_model_loader`` by this package's ``vllm.general_plugins`` entry
point (``workers.vllm.plugin``), so installing the package is enough:

    REMOTE_INSTANCE_IP=10.0.0.5 REMOTE_INSTANCE_SERVER_PORT=8000 REMOTE_INSTANCE_PORTS=30001,30002 \\
        vllm serve M --tensor-parallel-size 2 --load-format remote_instance

The seed is named as vLLM PR #27417 names it (those three environment variables) or through
``--model-loader-extra-config`` JSON, which takes precedence: ``seed_url``
("http://host:port"), ``ports`` (one per client TP rank, on the seed's host: a list or
"p0,p1"), ``api_key`` (sent to the seed), ``timeout`` (seconds any one step may take: each HTTP
call, the rendezvous, each transfer without progress; default 300), ``backend`` (``gloo`` on
CPU, ``nccl`` on CUDA: the default follows vLLM's device) and ``seed_api`` (``vllm``, the default:
a vLLM seed through ``/collective_rpc``; ``ckpt-engine``: our reference server's routes).
Unknown keys are refused.

Per vLLM worker (TP rank), in ``load_weights`` on the freshly created model, the reference
server's client (``remote_instance.loader.RemoteInstanceFormat``) runs on a
``VllmCheckpointView`` of it: the seed's manifest first, compared with this model's (config,
tensor names, dtypes, shapes; per-rank parameters at equal TP sizes): any difference refuses,
listing them, before a byte moves; then rank 0 asks the seed to form the pair groups and send
while every rank receives (equal TP sizes: each parameter straight into place; other TP sizes:
checkpoint tensors through vLLM's own weight loaders). vLLM's ``BaseModelLoader.load_model`` then
runs ``process_weights_after_loading`` once. Any failure raises ``RemoteInstanceError`` naming the
seed (and the tensor): vLLM exits with it; nothing falls back to disk.
"""

from __future__ import annotations

import time
from typing import Any

from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from ckpt_engine import json_depth
from workers.env import ENV, Env
from workers.errors import ConfigError
from workers.remote_instance.backend import TRANSFER_BACKENDS, default_backend
from workers.remote_instance.loader import RemoteInstanceFormat
from workers.remote_instance.plan import parse_ports
from workers.remote_instance.seed_client import SeedClient
from workers.remote_instance.settings import LOAD_FORMAT, SEED_APIS, RemoteInstanceSettings
from workers.vllm.checkpoint_view import VllmCheckpointView

logger = init_logger("vllm.ckpt_engine.fork")  # under vLLM's logger: shown in its log

EXTRA_KEYS = ("seed_url", "ports", "api_key", "timeout", "backend", "seed_api")
DEFAULT_TIMEOUT_S = 300.0


def parse_settings(extra: dict[str, Any], env: Env, device_type: str) -> RemoteInstanceSettings:
    """The fork settings from ``--model-loader-extra-config`` and the environment, validated
    (``ConfigError`` names the key at fault)."""
    if not isinstance(extra, dict):
        raise ConfigError(f"--model-loader-extra-config must be a JSON object, got {extra!r}")
    if unknown := sorted(set(extra) - set(EXTRA_KEYS)):
        raise ConfigError(
            f"--model-loader-extra-config: unknown key(s) {unknown} for --load-format "
            f"{LOAD_FORMAT}; known: {', '.join(EXTRA_KEYS)}"
        )
    url = extra.get("seed_url")
    if url is None and env.remote_instance_ip is not None:
        if env.remote_instance_server_port is None:
            raise ConfigError("REMOTE_INSTANCE_IP is set without REMOTE_INSTANCE_SERVER_PORT")
        host = env.remote_instance_ip
        host = f"[{host}]" if ":" in host else host
        url = f"http://{host}:{env.remote_instance_server_port}"
    if url is None:
        raise ConfigError(
            f"--load-format {LOAD_FORMAT} needs the seed: REMOTE_INSTANCE_IP and "
            'REMOTE_INSTANCE_SERVER_PORT, or --model-loader-extra-config \'{"seed_url": '
            '"http://host:port", ...}\''
        )
    ports = extra.get("ports")
    ports = ports if ports is not None else env.remote_instance_ports
    if ports is None:
        raise ConfigError(
            f"--load-format {LOAD_FORMAT} needs one group port per TP rank: REMOTE_INSTANCE_PORTS "
            "or --model-loader-extra-config '{\"ports\": [p0, ...]}'"
        )
    try:
        port_list = parse_ports(ports)
    except ValueError as e:
        raise ConfigError(f"remote_instance ports: {e}") from e
    backend = extra.get("backend")
    backend = backend if backend is not None else default_backend(device_type)
    if backend not in TRANSFER_BACKENDS:
        raise ConfigError(
            f"remote_instance backend {backend!r}: supported: {', '.join(TRANSFER_BACKENDS)}"
        )
    if TRANSFER_BACKENDS[backend].device_type != device_type:
        raise ConfigError(
            f"remote_instance backend {backend} moves {TRANSFER_BACKENDS[backend].device_type} "
            f"tensors; this vLLM runs on {device_type} (use {default_backend(device_type)})"
        )
    timeout = extra.get("timeout", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ConfigError(f"remote_instance timeout must be a positive number, got {timeout!r}")
    seed_api = extra.get("seed_api", "vllm")
    if seed_api not in SEED_APIS:
        raise ConfigError(f"remote_instance seed_api {seed_api!r}: use one of {list(SEED_APIS)}")
    api_key = extra.get("api_key")
    if api_key is not None and not isinstance(api_key, str):
        raise ConfigError("remote_instance api_key must be a string")
    try:
        seed = SeedClient.from_url(str(url), api_key, float(timeout))
    except Exception as e:
        raise ConfigError(f"remote_instance seed_url {url!r}: expected http://host:port") from e
    settings = RemoteInstanceSettings(
        seed_ip=seed.ip,
        seed_port=seed.port,
        ports=port_list,
        backend=backend,
        api_key=api_key,
        timeout=float(timeout),
        verify=False,
        seed_api=seed_api,
    )
    return settings


class RemoteInstanceModelLoader(BaseModelLoader):
    """``--load-format remote_instance`` (see the module doc)."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        from vllm.platforms import current_platform

        extra = load_config.model_loader_extra_config or {}
        if isinstance(extra, str):
            extra = json_depth.loads(extra, what="--model-loader-extra-config")
        self.settings = parse_settings(extra, ENV, current_platform.device_type)
        self.stats: dict[str, Any] = {}

    def download_model(self, model_config: ModelConfig) -> None:
        pass  # nothing is read from disk

    def load_weights(self, model, model_config: ModelConfig) -> None:
        started = time.perf_counter()
        view = VllmCheckpointView(model, model_config, effective=False)
        s = self.settings
        if len(s.ports) != view.tp.size:
            raise ConfigError(
                f"remote_instance ports {list(s.ports)}: this vLLM has TP {view.tp.size}, one "
                "port per TP rank is needed"
            )
        # vLLM's own parameters take checkpoint tensors (full mode), never slices
        fork = RemoteInstanceFormat(s, slices=False)
        fork.load(view, model_config.model)
        self.stats = {**fork.stats, "total_seconds": time.perf_counter() - started}
        logger.info(
            "TP rank %d: forked %.1f MB from seed %s (%s mode) in %.3f s (%.3f s with the "
            "manifest and rendezvous)",
            view.tp.rank,
            fork.stats["bytes"] / 1e6,
            fork.seed.url,
            fork.stats["mode"],
            fork.stats["seconds"],
            self.stats["total_seconds"],
        )
