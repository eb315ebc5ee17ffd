"""The client's fork settings, from `ServerArgs`, validated at start-up: missing or inconsistent
settings are a `ConfigError` (the server exits 2 naming them), never a silent load from disk.

Flags (SGLang's names): `--load-format remote_instance`,
`--remote-instance-weight-loader-seed-instance-ip`, `...-seed-instance-service-port` (the seed's
HTTP port), `...-send-weights-group-ports` (one per TP rank of this client, a JSON list or
comma-separated; ports on the seed's host, where the seed ranks host the group rendezvous),
`...-backend` (nccl | gloo | transfer_engine | modelexpress; default: nccl on cuda, gloo on
cpu; `transfer_engine` needs no group ports, `modelexpress` no seed address either, but
`--modelexpress-config`, see `coordination`). Ours: `...-seed-api-key` (the
seed's API key; default: this server's own --api-key, as a fleet usually shares one),
`...-timeout` (seconds any one step may take: each HTTP call, the rendezvous, each transfer
without progress), `...-seed-api` (`ckpt-engine`: a reference server, SGLang's routes; `vllm`: a
vLLM seed through `/collective_rpc`, `workers.vllm.seed`; gloo or nccl only) and
`...-verify-checksums` (compare every tensor's sha256 with the seed's
/weights_info after loading; costs a gather and hashing on both sides), `...-whole-tensors` (at
another TP size, receive whole checkpoint tensors: full mode, not slice mode; `plan`).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.errors import ConfigError
from workers.remote_instance.backend import TRANSFER_BACKENDS, default_backend
from workers.remote_instance.coordination import ModelExpressConfig
from workers.remote_instance.plan import parse_ports

LOAD_FORMAT = "remote_instance"
TRANSFER_ENGINE = "transfer_engine"
MODELEXPRESS = "modelexpress"
# Every --remote-instance-weight-loader-backend: pair-group backends, and the one-sided ones.
FORK_BACKENDS = (*TRANSFER_BACKENDS, TRANSFER_ENGINE, MODELEXPRESS)
PREFIX = "remote_instance_weight_loader_"
# Fields that only mean something with --load-format remote_instance (given otherwise: an error).
CLIENT_FIELDS = (
    "seed_instance_ip",
    "seed_instance_service_port",
    "send_weights_group_ports",
    "backend",
    "seed_api_key",
    "seed_api",
)
SEED_APIS = ("ckpt-engine", "vllm")


@dataclass(frozen=True, kw_only=True)
class RemoteInstanceSettings:
    seed_ip: str | None  # None with modelexpress: the registry names the seed
    seed_port: int | None
    ports: tuple[int, ...]  # only for the pair-group backends (nccl, gloo)
    backend: str
    api_key: str | None
    timeout: float
    verify: bool
    modelexpress: ModelExpressConfig | None = None
    seed_api: str = "ckpt-engine"
    whole_tensors: bool = False  # full mode even where slice mode could run

    @classmethod
    def from_server_args(cls, args) -> RemoteInstanceSettings:
        def get(name: str):
            return getattr(args, PREFIX + name)

        def flag(name: str) -> str:
            return "--" + (PREFIX + name).replace("_", "-")

        mx = None
        if args.modelexpress_config is not None:
            mx = ModelExpressConfig.parse(args.modelexpress_config, default_model=args.model_path)
        if args.load_format != LOAD_FORMAT:
            given = [flag(n) for n in CLIENT_FIELDS if get(n) is not None]
            given += [flag(n) for n in ("verify_checksums", "whole_tensors") if get(n)]
            if given:
                raise ConfigError(f"{', '.join(given)} given without --load-format {LOAD_FORMAT}")
            if mx is not None and not mx.source:
                raise ConfigError(
                    '--modelexpress-config without "source": true is a client setting: it needs '
                    f"--load-format {LOAD_FORMAT} {flag('backend')} {MODELEXPRESS}"
                )
            return None  # type: ignore[return-value]
        backend = get("backend") or default_backend(args.device)
        if backend not in FORK_BACKENDS:
            raise ConfigError(
                f"{flag('backend')} {backend!r}: supported: {', '.join(FORK_BACKENDS)}"
            )
        if not get("timeout") > 0:
            raise ConfigError(f"{flag('timeout')} must be positive")
        key = get("seed_api_key")
        seed_api = get("seed_api") or "ckpt-engine"
        if seed_api == "vllm" and backend not in TRANSFER_BACKENDS:
            raise ConfigError(
                f"{flag('seed_api')} vllm: a vLLM seed sends over {' or '.join(TRANSFER_BACKENDS)}"
                f", not {backend}"
            )
        common = dict(
            seed_api=seed_api,
            backend=backend,
            api_key=key if key is not None else args.api_key,
            timeout=get("timeout"),
            verify=get("verify_checksums"),
            whole_tensors=get("whole_tensors"),
            modelexpress=mx,
        )
        if backend == MODELEXPRESS:
            if mx is None:
                raise ConfigError(
                    f"{flag('backend')} {MODELEXPRESS} needs --modelexpress-config "
                    '\'{"url": "redis://host:port/0", "model_name": ...}\''
                )
            given = [flag(n) for n in CLIENT_FIELDS[:3] if get(n) is not None]
            if given:
                raise ConfigError(
                    f"{', '.join(given)}: not used with {flag('backend')} {MODELEXPRESS} (the "
                    "registry names the seed)"
                )
            return cls(seed_ip=None, seed_port=None, ports=(), **common)
        needed = CLIENT_FIELDS[:2] if backend == TRANSFER_ENGINE else CLIENT_FIELDS[:3]
        missing = [flag(n) for n in needed if get(n) in (None, "")]
        if missing:
            raise ConfigError(
                f"--load-format {LOAD_FORMAT} with {flag('backend')} {backend} needs "
                f"{', '.join(missing)}"
            )
        port = get("seed_instance_service_port")
        if not 0 < port < 65536:
            raise ConfigError(f"{flag('seed_instance_service_port')} {port}: not in 1..65535")
        if backend == TRANSFER_ENGINE:
            return cls(seed_ip=get("seed_instance_ip"), seed_port=port, ports=(), **common)
        try:
            ports = parse_ports(get("send_weights_group_ports"))
        except ValueError as e:
            raise ConfigError(f"{flag('send_weights_group_ports')}: {e}") from e
        if len(ports) != args.tp:
            raise ConfigError(
                f"{flag('send_weights_group_ports')} gives {len(ports)} port(s); "
                f"--tp {args.tp} needs one per TP rank"
            )
        if TRANSFER_BACKENDS[backend].device_type != args.device:
            raise ConfigError(
                f"{flag('backend')} {backend} moves {TRANSFER_BACKENDS[backend].device_type} "
                f"tensors; this server runs on --device {args.device} "
                f"(use {default_backend(args.device)})"
            )
        return cls(seed_ip=get("seed_instance_ip"), seed_port=port, ports=ports, **common)
