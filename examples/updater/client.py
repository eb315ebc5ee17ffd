"""The inference server's HTTP API (TCP or unix socket): wait for ``/ping``, trigger an update."""

from __future__ import annotations

import socket
import time

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool
from urllib3.connection import HTTPConnection


class InferenceError(RuntimeError):
    """The inference server refused or failed the update, or never answered."""


class _UnixAdapter(HTTPAdapter):
    """requests over a unix socket: every URL's host is ignored, the socket path is used."""

    def __init__(self, path: str) -> None:
        super().__init__()

        class _Connection(HTTPConnection):
            def _new_conn(self) -> socket.socket:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout if isinstance(self.timeout, int | float) else None)
                sock.connect(path)
                return sock

        self._pool = HTTPConnectionPool("localhost")
        self._pool.ConnectionCls = _Connection

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self._pool

    def get_connection(self, url, proxies=None):
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


class InferenceClient:
    def __init__(self, endpoint: str, *, uds: str | None, api_key: str | None) -> None:
        self.endpoint = endpoint
        self.session = requests.Session()
        if uds is not None:
            self.session.mount("http://", _UnixAdapter(uds))
            self.session.mount("https://", _UnixAdapter(uds))
        if api_key is not None:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def wait_ready(self, timeout_s: float) -> None:
        """Poll /ping until the server answers at all (a 503 counts: it is listening)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.session.get(f"{self.endpoint}/ping", timeout=5)
                return
            except requests.RequestException as e:
                if time.monotonic() > deadline:
                    raise InferenceError(f"{self.endpoint} not up after {timeout_s} s: {e}") from e
            time.sleep(0.2)

    def update(self, handles: dict[str, str], *, api: str, version: str | None, timeout_s: float):
        if api == "collective_rpc":
            path = "/collective_rpc"
            body = {"method": "update_weights_from_ipc", "args": [handles], "timeout": timeout_s}
        else:
            path = "/update_weights_from_ipc"
            body = {"zmq_handles": handles, "flush_cache": True, "weight_version": version}
        url = f"{self.endpoint}{path}"
        try:
            r = self.session.post(url, json=body, timeout=timeout_s + 60)
        except requests.RequestException as e:
            raise InferenceError(f"POST {url}: {e}") from e
        try:
            answer = r.json() if r.content else {}
        except ValueError:
            answer = {"message": r.text[:500]}
        if r.status_code != 200 or (isinstance(answer, dict) and answer.get("success") is False):
            message = answer.get("message", answer) if isinstance(answer, dict) else answer
            raise InferenceError(f"POST {url}: HTTP {r.status_code}: {message}")
