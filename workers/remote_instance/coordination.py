"""The `modelexpress` backend: seeds and clients find each other through a registry on Redis
(`ckpt_engine.registry`), with no seed address in the client's command; the bytes then move
one-sided with the `transfer_engine` backend.

`--modelexpress-config '{"url": "redis://...", "model_name": ..., "source": true}'` (SGLang's
flag and keys; a gRPC URL of a ModelExpress server is refused, naming what is supported). Ours,
optional: `instance_id` (default `<advertised host>:<port>`: a restarted seed overwrites its own
entry), `heartbeat_s` (2), `ttl_s` (10: a seed that stops beating disappears after this).

Seed (`source: true`): after start-up the front publishes, and republishes every `heartbeat_s`
(`SeedPublisher`): instance id, model name, weight version, TP size, manifest digest, ready (the
weights are servable, HTTP is up and no weight update is running: the front's weight listeners
republish at an update's start and end) and the backend it offers (`transfer_engine`: its HTTP URL, from which a
client gets the Mooncake session and addresses). Stopping withdraws the entry.

Client (`--load-format remote_instance --remote-instance-weight-loader-backend modelexpress`):
rank 0 waits (bounded by the fork timeout) for a ready seed whose manifest digest equals its
own, preferring the same TP size, then the least busy (a counter clients raise while they
read), and shares the choice with the other ranks; all read (`transfer_engine.read_from_seed`)
and vote; if any rank failed (the seed died mid-transfer), all move to the next seed.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import torch

from ckpt_engine import json_depth
from workers.errors import ConfigError, RemoteInstanceError

logger = logging.getLogger(__name__)

BACKEND = "modelexpress"
CONFIG_KEYS = ("url", "model_name", "source", "instance_id", "heartbeat_s", "ttl_s")


@dataclass(frozen=True, kw_only=True)
class ModelExpressConfig:
    url: str
    model_name: str
    source: bool = False
    instance_id: str | None = None
    heartbeat_s: float = 2.0
    ttl_s: float = 10.0

    @classmethod
    def parse(cls, text: str, *, default_model: str) -> ModelExpressConfig:
        from ckpt_engine.errors import RegistryError
        from ckpt_engine.registry.redis_store import check_url

        flag = "--modelexpress-config"
        try:
            raw = json_depth.loads(text, what=flag)
        except json_depth.JsonDepthError as e:
            raise ConfigError(str(e)) from None
        except ValueError as e:
            raise ConfigError(f"{flag}: not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{flag}: a JSON object is needed")
        if unknown := sorted(set(raw) - set(CONFIG_KEYS)):
            raise ConfigError(f"{flag}: unknown keys {unknown}; known: {', '.join(CONFIG_KEYS)}")
        if not isinstance(raw.get("url"), str):
            raise ConfigError(f'{flag}: "url" (redis://host:port/db) is required')
        try:
            check_url(raw["url"])
        except RegistryError as e:
            raise ConfigError(f"{flag}: {e}") from None
        raw.setdefault("model_name", default_model)
        for key, kind in (("model_name", str), ("source", bool), ("instance_id", str)):
            if raw.get(key) is not None and not isinstance(raw[key], kind):
                raise ConfigError(f"{flag}: {key!r} must be a {kind.__name__}")
        for key in ("heartbeat_s", "ttl_s"):
            value = raw.get(key, 1.0)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{flag}: {key!r} must be a positive number")
        config = cls(**raw)
        if config.ttl_s <= config.heartbeat_s:
            raise ConfigError(f"{flag}: ttl_s must exceed heartbeat_s")
        return config


def manifest_digest(manifest) -> str:
    """The digest two instances must share to fork: model config, checkpoint tensors (names,
    dtypes, shapes) and buffers (names, dtypes); not the TP size nor the weight version."""
    from ckpt_engine.registry.records import digest

    return digest(
        {
            "format": manifest.format,
            "config": [list(kv) for kv in manifest.config],
            "tensors": [[t.name, t.dtype, list(t.shape)] for t in manifest.tensors],
            "buffers": [[b.name, b.dtype] for b in manifest.buffers],
        }
    )


def advertised_host(bind: str) -> str:
    """The address others reach this server at: the bind address, unless it is a wildcard."""
    if bind not in ("", "0.0.0.0", "::"):
        return bind
    from ckpt_engine.p2p.service import local_address

    return local_address(socket.gethostname())


# -- collectives over the client's TP group ----------------------------------------------------------


def vote(tp, device: torch.device, state: int, tag: int) -> list[tuple[int, int]]:
    """Every rank's (state, tag), in rank order."""
    mine = torch.tensor([int(state), int(tag)], dtype=torch.int64, device=device)
    return [tuple(v.cpu().tolist()) for v in tp.all_gather_list(mine)]


def share_text(tp, device: torch.device, text: str | None) -> str:
    """Rank 0's `text`, on every rank (the others pass anything)."""
    data = (text or "").encode() if tp.rank == 0 else b""
    n = torch.tensor([len(data)], dtype=torch.int64, device=device)
    size = max(int(v.item()) for v in tp.all_gather_list(n))
    buf = torch.zeros(max(size, 1), dtype=torch.uint8, device=device)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    first = tp.all_gather_list(buf)[0][:size]
    return bytes(first.cpu().tolist()).rstrip(b"\0").decode()


# -- seed side (the front process) ------------------------------------------------------------------


class SeedPublisher:
    """Keeps this seed's record in the registry while the server runs."""

    def __init__(
        self,
        config: ModelExpressConfig,
        *,
        front,
        url: str,
        tp_size: int,
        digest: str,
        started=lambda: True,
    ):
        from ckpt_engine.registry.redis_store import Heartbeat, RedisRegistry

        self.config, self.front, self.url, self.started = config, front, url, started
        self.tp_size, self.digest = tp_size, digest
        host = urlsplit(url)
        self.instance = config.instance_id or f"{host.hostname}:{host.port}"
        self.registry = RedisRegistry(config.url)
        self.heartbeat = Heartbeat(self.registry, self.record, interval_s=config.heartbeat_s)
        listeners = getattr(front, "weight_listeners", None)
        if listeners is not None:  # an update: republish at its start (not ready) and end
            listeners.append(self.heartbeat.poke)
        logger.info(
            "published %s as a source of %r in the registry at %s (every %g s, ttl %g s)",
            self.instance,
            config.model_name,
            self.registry.where,
            config.heartbeat_s,
            config.ttl_s,
        )

    def record(self):
        from ckpt_engine.registry.records import SourceRecord

        state = self.front.state
        return SourceRecord(
            model=self.config.model_name,
            instance=self.instance,
            digest=self.digest,
            tp_size=self.tp_size,
            ready=bool(state.servable)
            and bool(self.started())
            and not getattr(self.front, "changing_weights", False),
            weight_version=state.version,
            backends={"transfer_engine": {"url": self.url}},
            heartbeat_at=time.time(),
            ttl_s=self.config.ttl_s,
        )

    def stop(self) -> None:
        self.heartbeat.stop()
        self.registry.close()


def start_publisher(args, front, ranks, *, started) -> SeedPublisher | None:
    """The front's publisher when `--modelexpress-config` says `"source": true`, else None.
    Ready once the weights are servable and `started()` (HTTP is up)."""
    if args.modelexpress_config is None:
        return None
    config = ModelExpressConfig.parse(args.modelexpress_config, default_model=args.model_path)
    if not config.source:
        return None
    from workers.remote_instance.manifest import Manifest

    (raw, *_) = ranks.call("remote_instance_manifest", [], {}, timeout=args.rank_timeout)
    url = f"http://{advertised_host(args.host)}:{args.port}"
    return SeedPublisher(
        config,
        front=front,
        url=url,
        tp_size=args.tp,
        digest=manifest_digest(Manifest.from_json(raw)),
        started=started,
    )


# -- client side (each rank process) -----------------------------------------------------------------


class RegistrySeeds:
    """`seeds` for `transfer_engine.fork_one_sided`: the best ready seed in the registry (rank 0
    waits for one and shares its choice), skipping those that failed; counts itself busy on the
    seed it reads from. Collective (every rank calls `next`)."""

    def __init__(self, model, settings) -> None:
        from ckpt_engine.registry.records import Want
        from ckpt_engine.registry.redis_store import RedisRegistry
        from workers.remote_instance.manifest import build_manifest

        self.config: ModelExpressConfig = settings.modelexpress
        self.settings = settings
        self.tp = model.tp
        self.device = next(model.parameters()).device
        self.want = Want(
            model=self.config.model_name,
            digest=manifest_digest(build_manifest(model)),
            tp_size=self.tp.size,
            backends=("transfer_engine",),
        )
        self.deadline = time.monotonic() + settings.timeout
        self.registry = None
        self.reading: str | None = None
        self.error: str | None = None  # rank 0 could not reach the registry
        if self.tp.rank == 0:
            from ckpt_engine.errors import RegistryError

            try:
                self.registry = RedisRegistry(self.config.url)
            except RegistryError as e:
                self.error = str(e)

    def _pick(self, failed: dict[str, str]) -> str:
        from ckpt_engine.errors import RegistryError

        if self.error is not None:
            return json.dumps({"error": self.error})
        try:
            left = max(0.0, self.deadline - time.monotonic())
            logger.info(
                "waiting up to %.0f s for a ready seed of %r in the registry at %s",
                left,
                self.want.model,
                self.registry.where,
            )
            best = self.registry.wait_for(self.want, timeout_s=left, exclude=failed)[0]
        except RegistryError as e:
            return json.dumps({"error": str(e)})
        self.registry.acquire(
            self.config.model_name, best.instance, ttl_s=self.settings.timeout * 4
        )
        self.reading = best.instance
        return json.dumps(
            {"instance": best.instance, "url": best.backends["transfer_engine"]["url"]}
        )

    def next(self, failed: dict[str, str]):
        from workers.remote_instance.seed_client import SeedClient

        self._release()
        picked = json.loads(
            share_text(self.tp, self.device, self._pick(failed) if self.tp.rank == 0 else None)
        )
        if "error" in picked:
            tried = "; ".join(f"{k}: {v}" for k, v in failed.items())
            raise RemoteInstanceError(picked["error"] + (f" (failed: {tried})" if tried else ""))
        logger.info(
            "rank %d: forking from %s (%s), found in the registry",
            self.tp.rank,
            picked["instance"],
            picked["url"],
        )
        s = self.settings
        return picked["instance"], SeedClient.from_url(picked["url"], s.api_key, s.timeout)

    def _release(self) -> None:
        if self.reading is not None and self.registry is not None:
            from ckpt_engine.errors import RegistryError

            try:
                self.registry.release(self.config.model_name, self.reading)
            except RegistryError as e:
                logger.warning("registry: %s", e)
        self.reading = None

    def close(self) -> None:
        self._release()
        if self.registry is not None:
            self.registry.close()
