"""P2P metas through the registry (Redis) instead of a file: the owners' rank 0 publishes the
gathered metas under a name (`--publish-metas NAME`), kept alive while the job runs (an expiring
key, refreshed; deleted at exit); a joining job waits for it (`--find-metas NAME`, bounded by
`--ready-timeout`). Both name the Redis with `--metas-registry redis://[user:password@]host/db`
(`rediss://` for TLS).

The metas carry each owner's address and read token: whoever can read the key can read the
owners' host memory, exactly as with the metas file. Protect the key as the file: a Redis
password or an ACL user that only the jobs use (limited to `ckpt-engine:v1:doc:*`), and TLS
(`rediss://`) where the network is not trusted.
"""

from __future__ import annotations

import logging
import threading

from ckpt_engine import CheckpointMetas
from ckpt_engine.errors import RegistryError
from ckpt_engine.registry.redis_store import RedisRegistry

logger = logging.getLogger("ckpt_engine.examples.update")

TTL_S = 30.0  # the published metas outlive a dead owner job by this much at most
PREFIX = "p2p-metas/"


class MetasPublisher:
    """Publishes `metas` under `name` and refreshes its expiry every TTL/3 until `stop()`."""

    def __init__(self, url: str, name: str, metas: CheckpointMetas, *, ttl_s: float = TTL_S):
        self.registry, self.name, self.ttl_s = RedisRegistry(url), PREFIX + name, ttl_s
        self.registry.put_document(self.name, metas.dumps(), ttl_s=ttl_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="metas-refresh", daemon=True)
        self._thread.start()
        logger.info("published the P2P metas as %r in %s", name, self.registry.where)

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.registry.touch_document(self.name, ttl_s=self.ttl_s)
            except RegistryError as e:
                logger.warning("refreshing the published metas failed (retrying): %s", e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.ttl_s)
        try:
            self.registry.delete_document(self.name)
        finally:
            self.registry.close()


def find_metas(url: str, name: str, *, timeout_s: float) -> CheckpointMetas:
    """The metas published under `name`, once they are (RegistryError after `timeout_s`)."""
    registry = RedisRegistry(url)
    try:
        return CheckpointMetas.loads(registry.wait_document(PREFIX + name, timeout_s=timeout_s))
    finally:
        registry.close()
