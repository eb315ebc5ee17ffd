"""The updater's flags: one keyword-only frozen dataclass, validated in ``__post_init__``; the
argparse CLI is derived from its fields (help, choices, defaults), unknown options are rejected."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from ckpt_engine.compat import WIRES

DESCRIPTION = "Push a safetensors checkpoint into running inference servers: one parameter-server rank per GPU."
UPDATE_METHODS = ("broadcast", "p2p", "all")
INFERENCE_APIS = ("collective_rpc", "update_weights_from_ipc", "weight_transfer")
REGISTER_MODES = ("separate", "overlap")


class ConfigError(ValueError):
    """Flags that cannot work together (exit 2)."""


def _opt(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


@dataclass(frozen=True, kw_only=True)
class UpdateArgs:
    checkpoint_path: str | None = field(
        default=None, metadata=_opt("folder of *.safetensors (+ model.safetensors.index.json)")
    )
    endpoint: str = field(
        default="http://localhost:19730",
        metadata=_opt(
            "inference server URL; a comma-separated list gives one per instance (or one per "
            "instance of this node)"
        ),
    )
    uds: str | None = field(
        default=None, metadata=_opt("reach the server over this unix socket (HTTP over UDS)")
    )
    inference_parallel_size: int = field(
        default=8, metadata=_opt("GPUs (ranks) per inference instance, e.g. its TP size")
    )
    checkpoint_name: str = field(default="my-checkpoint-iter-0", metadata=_opt("checkpoint name"))
    update_method: str = field(
        default="broadcast", metadata=_opt("how weights move", choices=UPDATE_METHODS)
    )
    register_mode: str = field(
        default="separate",
        metadata=_opt(
            "separate: register, gather, then update; overlap: one pass, the files read while "
            "the buckets already read move to the GPUs (ParameterServer.register_and_update; "
            "a training step's new files)",
            choices=REGISTER_MODES,
        ),
    )
    inference_api: str = field(
        default="collective_rpc",
        metadata=_opt(
            "collective_rpc: vLLM's POST /collective_rpc (worker extension); "
            "update_weights_from_ipc: SGLang's; weight_transfer: vLLM's RL endpoints (/pause, "
            "/start_weight_update, /update_weights, /finish_weight_update, /resume) with "
            '--weight-transfer-config \'{"backend": "ckpt_engine"}\'',
            choices=INFERENCE_APIS,
        ),
    )
    wire: str = field(
        default="ckpt-engine",
        metadata=_opt(
            "protocol to the workers: ckpt-engine (ours), or upstream: checkpoint-engine 0.4.x's, "
            "for servers running its worker (opt-in; unsafe against local attackers)",
            choices=WIRES,
        ),
    )
    save_metas_file: str | None = field(
        default=None, metadata=_opt("rank 0 writes the gathered metas here (JSON)")
    )
    load_metas_file: str | None = field(
        default=None,
        metadata=_opt("join running instances: their --save-metas-file (with --update-method p2p)"),
    )
    metas_registry: str | None = field(
        default=None,
        metadata=_opt(
            "Redis (redis://[user:password@]host:port/db, rediss:// for TLS) that carries the "
            "P2P metas instead of a file (--publish-metas / --find-metas)"
        ),
    )
    publish_metas: str | None = field(
        default=None,
        metadata=_opt("rank 0 publishes the gathered metas under this name in --metas-registry"),
    )
    find_metas: str | None = field(
        default=None,
        metadata=_opt(
            "join running instances: the metas they published under this name in "
            "--metas-registry (with --update-method p2p)"
        ),
    )
    weight_version: str | None = field(
        default=None, metadata=_opt("version the server reports after the update")
    )
    api_key: str | None = field(
        default=None,
        metadata=_opt("sent as Authorization: Bearer (default: $CKPT_ENGINE_API_KEY)", env=True),
    )
    sleep_time: float = field(default=0.0, metadata=_opt("seconds to sleep before the update"))
    device: str | None = field(
        default=None,
        metadata=_opt("cpu or cuda (default: cuda when present)", choices=("cpu", "cuda")),
    )
    timeout: float = field(default=300.0, metadata=_opt("seconds one update may take"))
    ready_timeout: float = field(
        default=300.0, metadata=_opt("seconds to wait for the inference server's /ping")
    )
    result_file: str | None = field(
        default=None, metadata=_opt("rank 0 writes the timings here (JSON)")
    )
    json_out: str | None = field(
        default=None,
        metadata=_opt(
            "every rank appends one JSON line per update to this file (- for stdout): phase "
            "seconds, bytes, tensors, buckets, result; for RL orchestrators (see report.py)"
        ),
    )

    watch: str | None = field(
        default=None,
        metadata=_opt(
            "stay up and push each new complete checkpoint DIR/<name>/ (complete once its "
            "marker file DIR/<name>/COMPLETE exists; names in natural order, the newest wins; "
            "see updater/watch.py); its name is the checkpoint name and, with an API that "
            "carries one, the weight version",
            metavar="DIR",
        ),
    )
    watch_interval: float = field(
        default=1.0, metadata=_opt("--watch: seconds between two listings of DIR")
    )
    watch_max_updates: int | None = field(
        default=None, metadata=_opt("--watch: exit 0 after this many checkpoints pushed")
    )
    watch_idle_timeout: float | None = field(
        default=None,
        metadata=_opt("--watch: exit 0 after this many seconds without a new checkpoint"),
    )

    def __post_init__(self) -> None:
        self._check_watch()
        if self.inference_parallel_size < 1:
            raise ConfigError("--inference-parallel-size must be >= 1")
        joins = self.load_metas_file is not None or self.find_metas is not None
        if self.load_metas_file is not None and self.find_metas is not None:
            raise ConfigError("give --load-metas-file or --find-metas, not both")
        if self.checkpoint_path is None and not joins and self.watch is None:
            raise ConfigError(
                "give --checkpoint-path (or --watch, or --load-metas-file / --find-metas)"
            )
        if (self.update_method == "p2p") != joins:
            raise ConfigError(
                "--update-method p2p and --load-metas-file go together (or --find-metas)"
            )
        if (self.publish_metas is not None or self.find_metas is not None) != (
            self.metas_registry is not None
        ):
            raise ConfigError("--metas-registry and --publish-metas / --find-metas go together")
        if self.metas_registry is not None:
            from ckpt_engine.errors import RegistryError
            from ckpt_engine.registry.redis_store import check_url

            try:
                check_url(self.metas_registry)
            except RegistryError as e:
                raise ConfigError(f"--metas-registry: {e}") from None
        if self.publish_metas is not None and joins:
            raise ConfigError("--publish-metas publishes the owners' metas: not on a joining job")
        if self.register_mode == "overlap" and (
            self.update_method != "broadcast"
            or self.save_metas_file is not None
            or self.publish_metas is not None
        ):
            raise ConfigError(
                "--register-mode overlap works with --update-method broadcast, without "
                "--save-metas-file / --publish-metas (the metas are gathered inside the update)"
            )
        if self.wire != "ckpt-engine" and self.update_method != "broadcast":
            raise ConfigError("--wire upstream works with --update-method broadcast only")
        if self.checkpoint_path is not None and joins:
            raise ConfigError(
                "--load-metas-file / --find-metas join with the owners' checkpoint: no "
                "--checkpoint-path"
            )
        if self.weight_version is not None and self.inference_api == "collective_rpc":
            raise ConfigError(
                "--weight-version needs --inference-api update_weights_from_ipc or "
                "weight_transfer (vLLM's /collective_rpc carries no version)"
            )
        for name in ("timeout", "ready_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.sleep_time < 0:
            raise ConfigError("--sleep-time must be >= 0")
        for url in self.endpoints:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"--endpoint {url!r} must start with http:// or https://")

    def _check_watch(self) -> None:
        if not self.watch_interval > 0:
            raise ConfigError("--watch-interval must be positive")
        for name in ("watch_max_updates", "watch_idle_timeout"):
            value = getattr(self, name)
            if value is None:
                continue
            flag = f"--{name.replace('_', '-')}"
            if self.watch is None:
                raise ConfigError(f"{flag} goes with --watch")
            if not value > 0:
                raise ConfigError(f"{flag} must be positive")
        if self.watch is None:
            return
        clashes = {
            "--checkpoint-path": self.checkpoint_path is not None,
            "--load-metas-file / --find-metas": (
                self.load_metas_file is not None or self.find_metas is not None
            ),
            "--update-method p2p / all": self.update_method != "broadcast",
            "--save-metas-file / --publish-metas": (
                self.save_metas_file is not None or self.publish_metas is not None
            ),
            "--weight-version (each checkpoint's name is its version)": (
                self.weight_version is not None
            ),
            "--result-file (use --json-out: one line per push)": self.result_file is not None,
            "--sleep-time": self.sleep_time != 0,
        }
        bad = [flag for flag, given in clashes.items() if given]
        if bad:
            raise ConfigError(f"--watch pushes the checkpoints it finds: not with {', '.join(bad)}")

    def for_checkpoint(self, path: str, name: str) -> UpdateArgs:
        """--watch: the flags of a single update of the checkpoint at ``path`` (its version is
        its name where the inference API carries one)."""
        return dataclasses.replace(
            self,
            watch=None,
            watch_max_updates=None,
            watch_idle_timeout=None,
            checkpoint_path=path,
            checkpoint_name=name,
            weight_version=None if self.inference_api == "collective_rpc" else name,
        )

    @property
    def endpoints(self) -> list[str]:
        return [e.strip().rstrip("/") for e in self.endpoint.split(",") if e.strip()]

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> UpdateArgs:
        parser = argparse.ArgumentParser(description=DESCRIPTION, allow_abbrev=False)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = {k: v for k, v in f.metadata.items() if k != "env"}
            hint = hints[f.name]
            kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
            parser.add_argument(
                f"--{f.name.replace('_', '-')}", type=kind, default=f.default, **meta
            )
        values = vars(parser.parse_args(argv))
        if values["api_key"] is None:
            values["api_key"] = os.environ.get("CKPT_ENGINE_API_KEY") or None
        try:
            return cls(**values)
        except ConfigError as e:
            parser.error(str(e))
            raise
