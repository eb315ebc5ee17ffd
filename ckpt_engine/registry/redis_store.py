"""The registry's I/O, on Redis (``redis://`` or ``rediss://`` for TLS; the client is the
``redis`` package, imported lazily).

Keys (``<prefix>`` is ``ckpt-engine:v1``; model, instance and document names are %-quoted, so
they hold no ``:`` and no glob character):
- ``<prefix>:src:<model>:<instance>``: a ``SourceRecord`` (JSON), written with an expiry of its
  ``ttl_s``: a source that stops republishing (``Heartbeat``) disappears by itself;
- ``<prefix>:busy:<model>:<instance>``: readers transferring from that source now (INCR/DECR,
  expiring, so a reader that dies does not count forever);
- ``<prefix>:doc:<name>``: an opaque JSON document (P2P metas), optionally expiring (and a
  channel of the same name, told of each put);
- channel ``<prefix>:events:<model>``: a message after every publication, so ``wait_for``
  wakes when a source appears instead of polling.

Access control is Redis's own: a password or ACL user in the URL
(``redis://user:password@host:6379/0``), TLS with ``rediss://``. Whoever can read these keys can
reach the sources (and, for P2P metas, holds the read tokens): give readers an ACL user limited
to ``ckpt-engine:v1:*``. Every error is a ``RegistryError`` naming the server (without the
password) and what to fix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from ckpt_engine.errors import RegistryError
from ckpt_engine.registry.records import RecordError, SourceRecord, Want, choose, passed_over

logger = logging.getLogger(__name__)

PREFIX = "ckpt-engine:v1"
SCHEMES = ("redis", "rediss")


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_url(url: str) -> str:
    """``url`` if it is a Redis URL, else a RegistryError saying what is supported."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme not in SCHEMES:
        raise RegistryError(
            f"registry URL {redact(url)!r}: only Redis is supported (redis://host:port/db, or "
            "rediss:// for TLS); a ModelExpress gRPC server is not: point ModelExpress's own "
            "Redis here instead"
        )
    return url


def _q(name: str) -> str:
    return quote(name, safe="")


class RedisRegistry:
    def __init__(self, url: str, *, timeout_s: float = 10.0, prefix: str = PREFIX) -> None:
        self.url = check_url(url)
        self.where = redact(url)
        self.prefix = prefix
        self.timeout_s = timeout_s
        try:
            import redis
        except ImportError as e:
            raise RegistryError(
                f"the registry needs the redis package (pip install redis): {e}"
            ) from e
        self._redis = redis
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._call(self.client.ping)

    # -- errors ----------------------------------------------------------------------------------
    def _call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        errors = self._redis.exceptions
        try:
            return fn(*args, **kwargs)
        except errors.AuthenticationError as e:
            raise RegistryError(
                f"Redis at {self.where} refused the credentials ({e}): check the password (or "
                "ACL user) in the URL, redis://[user]:password@host:port"
            ) from e
        except errors.ResponseError as e:
            text = str(e)
            if text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
                raise RegistryError(
                    f"Redis at {self.where} refused the request ({text}): check the password "
                    "or ACL user in the URL and its rights on ckpt-engine:v1:*"
                ) from e
            raise RegistryError(f"Redis at {self.where}: {text}") from e
        except (errors.ConnectionError, errors.TimeoutError, OSError) as e:
            raise RegistryError(
                f"cannot reach Redis at {self.where} within {self.timeout_s:g} s: {e}",
                timed_out=isinstance(e, errors.TimeoutError),
            ) from e

    # -- keys ------------------------------------------------------------------------------------
    def _src(self, model: str, instance: str = "*") -> str:
        tail = "*" if instance == "*" else _q(instance)
        return f"{self.prefix}:src:{_q(model)}:{tail}"

    def _busy(self, model: str, instance: str) -> str:
        return f"{self.prefix}:busy:{_q(model)}:{_q(instance)}"

    def _events(self, model: str) -> str:
        return f"{self.prefix}:events:{_q(model)}"

    def _doc(self, name: str) -> str:
        return f"{self.prefix}:doc:{_q(name)}"

    # -- sources -----------------------------------------------------------------------------------
    def publish(self, record: SourceRecord) -> None:
        """Write ``record`` (expiring after its ``ttl_s``) and tell waiters."""
        key = self._src(record.model, record.instance)
        ttl_ms = max(1, int(record.ttl_s * 1000))
        pipe = self.client.pipeline()
        pipe.set(key, record.to_json(), px=ttl_ms)
        pipe.publish(self._events(record.model), record.instance)
        self._call(pipe.execute)

    def withdraw(self, model: str, instance: str) -> None:
        pipe = self.client.pipeline()
        pipe.delete(self._src(model, instance))
        pipe.publish(self._events(model), instance)
        self._call(pipe.execute)

    def sources(self, model: str) -> list[SourceRecord]:
        """Every live record of ``model`` (malformed ones are logged and skipped)."""
        keys = sorted(self._call(lambda: list(self.client.scan_iter(self._src(model), count=500))))
        if not keys:
            return []
        out = []
        for key, value in zip(keys, self._call(self.client.mget, keys), strict=True):
            if value is None:  # expired between SCAN and MGET
                continue
            try:
                out.append(SourceRecord.from_json(value))
            except RecordError as e:
                logger.warning("registry %s: skipping %s: %s", self.where, key.decode(), e)
        return out

    def busy(self, model: str, instances: Iterable[str]) -> dict[str, int]:
        instances = list(instances)
        if not instances:
            return {}
        values = self._call(self.client.mget, [self._busy(model, i) for i in instances])
        return {i: int(v) if v is not None else 0 for i, v in zip(instances, values, strict=True)}

    def acquire(self, model: str, instance: str, *, ttl_s: float) -> None:
        """Count one more reader of ``instance`` (for ``ttl_s`` at most)."""
        pipe = self.client.pipeline()
        pipe.incr(self._busy(model, instance))
        pipe.pexpire(self._busy(model, instance), max(1, int(ttl_s * 1000)))
        self._call(pipe.execute)

    def release(self, model: str, instance: str) -> None:
        key = self._busy(model, instance)
        if self._call(self.client.decr, key) <= 0:
            self._call(self.client.delete, key)

    def wait_for(
        self,
        want: Want,
        *,
        timeout_s: float,
        exclude: Iterable[str] = (),
        recheck_s: float = 1.0,
    ) -> list[SourceRecord]:
        """The usable sources of ``want``, best first, once there is one; RegistryError (timed
        out, listing why each known source was passed over) after ``timeout_s``. Wakes on every
        publication of the model (pub/sub), and every ``recheck_s`` regardless."""
        exclude = set(exclude)
        deadline = time.monotonic() + timeout_s
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self._call(pubsub.subscribe, self._events(want.model))
        try:
            while True:
                records = self.sources(want.model)  # after subscribing: no publication is missed
                now = time.time()
                busy = self.busy(want.model, [r.instance for r in records])
                found = choose(records, want, now=now, busy=busy, exclude=exclude)
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    reasons = passed_over(records, want, now=now, exclude=exclude)
                    raise RegistryError(
                        f"no ready source of model {want.model!r} (digest {want.digest}) in "
                        f"Redis at {self.where} after {timeout_s:g} s: "
                        + ("; ".join(reasons) if reasons else "none published"),
                        timed_out=True,
                    )
                self._call(pubsub.get_message, timeout=min(left, recheck_s))
        finally:
            pubsub.close()

    # -- documents -----------------------------------------------------------------------------
    def put_document(self, name: str, text: str, *, ttl_s: float | None = None) -> None:
        px = None if ttl_s is None else max(1, int(ttl_s * 1000))
        pipe = self.client.pipeline()
        pipe.set(self._doc(name), text, px=px)
        pipe.publish(self._doc(name), "put")  # the channel of the same name wakes waiters
        self._call(pipe.execute)

    def get_document(self, name: str) -> str | None:
        value = self._call(self.client.get, self._doc(name))
        return None if value is None else value.decode()

    def touch_document(self, name: str, *, ttl_s: float) -> bool:
        return bool(self._call(self.client.pexpire, self._doc(name), max(1, int(ttl_s * 1000))))

    def delete_document(self, name: str) -> None:
        self._call(self.client.delete, self._doc(name))

    def wait_document(self, name: str, *, timeout_s: float, recheck_s: float = 1.0) -> str:
        """The document once it exists (woken by its publication); RegistryError after
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self._call(pubsub.subscribe, self._doc(name))
        try:
            while (text := self.get_document(name)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RegistryError(
                        f"no document {name!r} in Redis at {self.where} after {timeout_s:g} s "
                        "(is the publisher running, with the same name and Redis database?)",
                        timed_out=True,
                    )
                self._call(pubsub.get_message, timeout=min(left, recheck_s))
            return text
        finally:
            pubsub.close()

    def close(self) -> None:
        self.client.close()


class Heartbeat:
    """Republish ``make()``'s record every ``interval_s`` on a daemon thread until ``stop()``
    (which withdraws it); ``poke()`` republishes now (after a state change). A failed
    publication is logged and retried at the next beat: the record expires meanwhile, which is
    what readers should see of a source that cannot reach the registry."""

    def __init__(
        self, registry: RedisRegistry, make: Callable[[], SourceRecord], *, interval_s: float
    ) -> None:
        self.registry, self.make, self.interval_s = registry, make, interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.last: SourceRecord | None = None
        self.last_error: str | None = None
        self.registry.publish(self._beat_record())  # the first one fails loudly
        self._thread = threading.Thread(target=self._run, name="registry-heartbeat", daemon=True)
        self._thread.start()

    def _beat_record(self) -> SourceRecord:
        self.last = self.make()
        return self.last

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.registry.publish(self._beat_record())
                self.last_error = None
            except (RegistryError, RecordError) as e:
                if self.last_error is None:
                    logger.warning("registry heartbeat failed (retrying): %s", e)
                self.last_error = str(e)

    def poke(self) -> None:
        self._wake.set()

    def stop(self, *, withdraw: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(self.interval_s + self.registry.timeout_s)
        if withdraw and self.last is not None:
            try:
                self.registry.withdraw(self.last.model, self.last.instance)
            except RegistryError as e:
                logger.warning("registry: could not withdraw %s: %s", self.last.instance, e)
