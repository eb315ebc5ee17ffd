"""HTTP calls from a forking client to its seed's front: every call carries the seed's API key
and a timeout; every answer is checked (an error status raises `RemoteInstanceError` quoting
the seed's message), unlike SGLang's client, which ignores the replies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from ckpt_engine import json_depth
from workers.errors import RemoteInstanceError
from workers.remote_instance.manifest import Manifest

MANIFEST_PATH = "/remote_instance_manifest"
INIT_PATH = "/init_weights_send_group_for_remote_instance"
SEND_PATH = "/send_weights_to_remote_instance"
TE_INFO_PATH = "/get_remote_instance_transfer_engine_info"


@dataclass(frozen=True)
class SeedAddress:
    """Where a seed answers HTTP, with the key and timeout of every call to it (the part every
    seed client shares, whatever API the seed speaks)."""

    ip: str
    port: int
    api_key: str | None
    timeout: float

    @classmethod
    def from_url(cls, url: str, api_key: str | None, timeout: float):
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise RemoteInstanceError(f"seed URL {url!r}: expected http://host:port")
        return cls(parts.hostname, parts.port, api_key, timeout)

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class SeedClient(SeedAddress):
    def _call(self, method: str, path: str, body: dict | None = None, *, read_timeout=None) -> Any:
        headers = {} if self.api_key is None else {"Authorization": f"Bearer {self.api_key}"}
        timeout = (self.timeout, self.timeout if read_timeout is None else read_timeout)
        try:
            r = requests.request(
                method, self.url + path, json=body, headers=headers, timeout=timeout
            )
        except requests.RequestException as e:
            raise RemoteInstanceError(f"seed {self.url}{path}: {e}") from e
        try:
            data = json_depth.loads(r.content, what=f"seed {self.url}{path}: the answer")
        except json_depth.JsonDepthError as e:
            raise RemoteInstanceError(str(e)) from None
        except ValueError:
            data = {"message": r.text[:500]}
        if r.status_code != 200 or (isinstance(data, dict) and data.get("success") is False):
            message = data.get("message", data) if isinstance(data, dict) else data
            raise RemoteInstanceError(f"seed {self.url}{path} answered {r.status_code}: {message}")
        return data

    def manifest(self) -> Manifest:
        return Manifest.from_json(self._call("GET", MANIFEST_PATH))

    def init_group(
        self,
        *,
        ports: tuple[int, ...],
        group_name: str,
        backend: str,
        slices: dict | None = None,
    ) -> None:
        """`slices`: ask for slice mode (a `slices.SliceRequest`'s JSON)."""
        body = {
            "master_address": self.ip,
            "ports": ",".join(map(str, ports)),
            "group_rank": 0,
            "world_size": 2,
            "group_name": group_name,
            "backend": backend,
        }
        if slices is not None:
            body["slices"] = slices
        self._call("POST", INIT_PATH, body)

    def send(self, *, ports: tuple[int, ...], group_name: str, read_timeout: float) -> dict:
        body = {
            "master_address": self.ip,
            "ports": ",".join(map(str, ports)),
            "group_name": group_name,
        }
        return self._call("POST", SEND_PATH, body, read_timeout=read_timeout)

    def transfer_engine_info(self, rank: int | None = None) -> dict:
        """The seed's Mooncake session and parameter addresses: every rank's (`ranks`), or one
        rank's in SGLang's shape; with `tp_size`, `generation` and `weight_version`."""
        path = TE_INFO_PATH if rank is None else f"{TE_INFO_PATH}?rank={rank}"
        data = self._call("GET", path)
        if not isinstance(data, dict) or not isinstance(data.get("generation"), int):
            raise RemoteInstanceError(f"seed {self.url}{TE_INFO_PATH}: malformed answer")
        return data

    def weights_info(self) -> dict:
        return self._call("GET", "/weights_info", read_timeout=None)
