"""`ServerArgs`: the reference server's settings, one frozen keyword-only record.

The command line is derived from the fields (flag = `--field-name`, plus aliases, type, default,
choices and help from the field's metadata), so the two cannot drift. Unknown options and
abbreviations are rejected; values are validated in `__post_init__` with `ConfigError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.env import ENV
from workers.errors import ConfigError
from workers.model_loader import LOAD_FORMATS
from workers.remote_instance.settings import (
    FORK_BACKENDS,
    PREFIX,
    SEED_APIS,
    RemoteInstanceSettings,
)

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _opt(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


@dataclass(frozen=True, kw_only=True)
class ServerArgs:
    model_path: str = field(
        metadata=_opt("Hugging Face model folder: config.json, *.safetensors (+ index), tokenizer")
    )
    tp: int = field(
        default=1,
        metadata=_opt("tensor-parallel size: one rank process per device", aliases=("--tp-size",)),
    )
    device: str | None = field(
        default=None,
        metadata=_opt("cpu or cuda (default: cuda when present)", choices=("cpu", "cuda")),
    )
    dtype: str = field(
        default="auto",
        metadata=_opt("parameter dtype; auto = the checkpoint's own", choices=DTYPE_CHOICES),
    )
    load_format: str = field(
        default="auto",
        metadata=_opt(
            "auto: read the safetensors; dummy: random values, same memory; "
            "remote_instance: fork from a running seed server (GPU to GPU)",
            choices=tuple(LOAD_FORMATS),
        ),
    )
    wait_for_initial_weights: bool = field(
        default=False,
        metadata=_opt(
            "report unhealthy and refuse /generate until the first weight update arrives",
            aliases=("--checkpoint-engine-wait-weights-before-ready",),
        ),
    )
    wait_for_initial_weights_timeout: float = field(
        default=120.0,
        metadata=_opt("seconds to wait for the initial weights; after that /health stays 503"),
    )
    weight_version: str = field(
        default="default", metadata=_opt("version reported for the weights loaded at startup")
    )
    host: str = field(default="127.0.0.1", metadata=_opt("HTTP bind address"))
    port: int = field(default=30000, metadata=_opt("HTTP port"))
    max_request_bytes: int = field(
        default=16 << 20,
        metadata=_opt("largest request body accepted (bytes); a larger one is answered 413"),
    )
    api_key: str | None = field(
        default=None,
        metadata=_opt(
            "key required (Authorization: Bearer) by weight-changing endpoints "
            "(default: $CKPT_ENGINE_API_KEY)",
            env="api_key",
        ),
    )
    rank_timeout: float = field(
        default=300.0, metadata=_opt("seconds any one command may take on the rank processes")
    )
    startup_timeout: float = field(
        default=1800.0, metadata=_opt("seconds the rank processes may take to build and load")
    )
    seed: int = field(default=0, metadata=_opt("seed of the dummy weights"))
    base_gpu_id: int = field(
        default=0, metadata=_opt("first CUDA device: rank r runs on cuda:(base_gpu_id + r)")
    )
    # --load-format remote_instance (fork from a running seed; workers.remote_instance.settings)
    remote_instance_weight_loader_seed_instance_ip: str | None = field(
        default=None, metadata=_opt("fork: the seed server's IP address")
    )
    remote_instance_weight_loader_seed_instance_service_port: int | None = field(
        default=None, metadata=_opt("fork: the seed server's HTTP port")
    )
    remote_instance_weight_loader_send_weights_group_ports: str | None = field(
        default=None,
        metadata=_opt(
            "fork: one port per TP rank of this server, on the seed's host, e.g. '[30001,30002]'"
        ),
    )
    remote_instance_weight_loader_backend: str | None = field(
        default=None,
        metadata=_opt(
            "fork: transfer backend (default: nccl on cuda, gloo on cpu); transfer_engine: "
            "one-sided Mooncake reads (no group ports); modelexpress: the seed found in a "
            "Redis registry (--modelexpress-config), then transfer_engine",
            choices=FORK_BACKENDS,
        ),
    )
    remote_instance_weight_loader_seed_api: str | None = field(
        default=None,
        metadata=_opt(
            "fork: what the seed is: ckpt-engine (default: a reference server) or vllm (a vLLM "
            "with --worker-extension-cls workers.vllm.CkptEngineWorkerExtension, reached "
            "through /collective_rpc)",
            choices=SEED_APIS,
        ),
    )
    remote_instance_weight_loader_start_seed_via_transfer_engine: bool = field(
        default=False,
        metadata=_opt(
            "seed: register the parameters with Mooncake's transfer engine at start, so clients "
            "read them one-sided (backend transfer_engine; no authentication: trusted fabric only)"
        ),
    )
    modelexpress_config: str | None = field(
        default=None,
        metadata=_opt(
            'coordination on Redis, JSON: {"url": "redis://host:port/0" (or rediss://), '
            '"model_name": ..., "source": true (seed: publish this server)}'
        ),
    )
    remote_instance_weight_loader_seed_api_key: str | None = field(
        default=None, metadata=_opt("fork: the seed's API key (default: this server's --api-key)")
    )
    remote_instance_weight_loader_timeout: float = field(
        default=120.0,
        metadata=_opt(
            "fork, as client and as seed: seconds any one step may take (an HTTP call, the "
            "group rendezvous, a transfer making no progress)"
        ),
    )
    remote_instance_weight_loader_verify_checksums: bool = field(
        default=False,
        metadata=_opt("fork: after loading, compare every tensor's sha256 with the seed's"),
    )
    remote_instance_weight_loader_whole_tensors: bool = field(
        default=False,
        metadata=_opt(
            "fork at another TP size over nccl/gloo: receive every whole checkpoint tensor "
            "(full mode) instead of only the rows/columns each rank keeps (slice mode)"
        ),
    )
    log_level: str = field(
        default="info",
        metadata=_opt(
            "log level (default: $CKPT_ENGINE_LOG_LEVEL, else info)",
            choices=LOG_LEVELS,
            env="log_level",
        ),
    )

    def __post_init__(self) -> None:
        if not Path(self.model_path, "config.json").is_file():
            raise ConfigError(f"--model-path {self.model_path}: no config.json there")
        if self.tp < 1:
            raise ConfigError(f"--tp must be >= 1, got {self.tp}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.max_request_bytes < 1:
            raise ConfigError(f"--max-request-bytes must be >= 1, got {self.max_request_bytes}")
        if self.base_gpu_id < 0:
            raise ConfigError(f"--base-gpu-id must be >= 0, got {self.base_gpu_id}")
        for name in ("wait_for_initial_weights_timeout", "rank_timeout", "startup_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        for name in ("device", "dtype", "load_format", "log_level", PREFIX + "backend"):
            choices = _metadata(name).get("choices")
            value = getattr(self, name)
            if choices and value is not None and value not in choices:
                raise ConfigError(
                    f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(choices)}"
                )
        if self.device is None:
            object.__setattr__(self, "device", _default_device())
        if self.device == "cuda":
            _check_cuda(self.base_gpu_id + self.tp)
        RemoteInstanceSettings.from_server_args(self)  # missing or inconsistent: ConfigError

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServerArgs:
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown server settings: {', '.join(sorted(unknown))}")
        return cls(**values)

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> ServerArgs:
        """Parse a command line; bad options exit with status 2 and the reason, like argparse."""
        parser = build_parser()
        values = vars(parser.parse_args(argv))
        for f in dataclasses.fields(cls):  # options backed by an environment variable
            env = f.metadata.get("env")
            if env is not None and values[f.name] is None:
                values[f.name] = getattr(ENV, env)
        try:
            return cls(**values)
        except ConfigError as e:
            parser.error(str(e))
            raise  # unreachable: parser.error exits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt-engine-server",
        description="ckpt-engine reference inference server",
        allow_abbrev=False,
    )
    hints = typing.get_type_hints(ServerArgs)
    for f in dataclasses.fields(ServerArgs):
        meta = dict(f.metadata)
        flags = [f"--{f.name.replace('_', '-')}", *meta.pop("aliases", ())]
        kind = _base_type(hints[f.name])
        required = f.default is dataclasses.MISSING
        from_env = meta.pop("env", None) is not None
        default = None if required or from_env else f.default
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action="store_true", **meta)
        else:
            parser.add_argument(
                *flags, dest=f.name, type=kind, default=default, required=required, **meta
            )
    return parser


def _metadata(name: str) -> dict[str, Any]:
    return dict(next(f.metadata for f in dataclasses.fields(ServerArgs) if f.name == name))


def _base_type(hint: Any) -> type:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_cuda(devices: int) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if torch.cuda.device_count() < devices:
        raise ConfigError(
            f"--base-gpu-id + --tp need {devices} CUDA devices, {torch.cuda.device_count()} visible"
        )
