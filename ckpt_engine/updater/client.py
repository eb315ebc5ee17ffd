"""The inference server's HTTP API (TCP or unix socket): wait for ``/ping``, trigger an update."""

from __future__ import annotations

import socket
import time

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool
from urllib3.connection import HTTPConnection

from ckpt_engine import json_depth

# workers.vllm.engine.SESSIONS_LEFT_OPEN (the updater does not import the inference side)
SESSIONS_LEFT_OPEN = "ckpt_engine: weight update sessions left open"


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
        elif api == "weight_transfer":
            path, body = "/update_weights", {"update_info": {"zmq_handles": handles}}
        else:
            path = "/update_weights_from_ipc"
            body = {"zmq_handles": handles, "flush_cache": True, "weight_version": version}
        self.post(path, body, timeout_s=timeout_s + 60)

    def post(self, path: str, body: dict | None = None, *, timeout_s: float = 60) -> dict:
        """POST and check the answer (200, no ``success: false``); raise InferenceError."""
        url = f"{self.endpoint}{path}"
        try:  # a connection per call: vLLM's server drops the one a 500 went out on
            r = self.session.post(
                url, json=body, headers={"Connection": "close"}, timeout=timeout_s
            )
        except requests.RequestException as e:
            raise InferenceError(f"POST {url}: {e}") from e
        try:  # a depth past the parser's limit is a ValueError too: the text is quoted
            answer = json_depth.loads(r.content, what=url, max_depth=None) if r.content else {}
        except ValueError:
            answer = {"message": r.text[:500]}
        if r.status_code != 200 or (isinstance(answer, dict) and answer.get("success") is False):
            message = answer.get("message", answer) if isinstance(answer, dict) else answer
            raise InferenceError(f"POST {url}: HTTP {r.status_code}: {message}")
        return answer if isinstance(answer, dict) else {"answer": answer}

    # -- vLLM's RL weight-transfer endpoints (--inference-api weight_transfer) -----------------
    def begin_weight_transfer(self, *, wire: str, timeout_s: float) -> None:
        """Pause vLLM (running requests finish on the old weights, new ones wait), then open a
        weight-update session of the ``ckpt_engine`` backend."""
        self.post("/pause?mode=wait", timeout_s=timeout_s)
        init = ("/init_weight_transfer_engine", {"init_info": {"wire": wire}})
        try:
            try:
                self.post(*init)
            except InferenceError as e:
                if SESSIONS_LEFT_OPEN not in str(e):
                    raise
                # a failed update at TP > 1 left vLLM's session open on all ranks but the last
                # (workers.vllm.engine): close them (the last rank's refusal is expected)
                self.session.post(
                    f"{self.endpoint}/finish_weight_update",
                    json={},
                    headers={"Connection": "close"},
                    timeout=timeout_s,
                )
                self.post(*init)
            self.post("/start_weight_update", timeout_s=timeout_s)
        except (InferenceError, requests.RequestException):
            self.resume()  # nothing was written
            raise

    def finish_weight_transfer(self, *, version: str | None, timeout_s: float) -> None:
        self.post("/finish_weight_update", {"weight_version": version}, timeout_s=timeout_s)
        self.resume()

    def resume(self) -> None:
        self.post("/resume")

    def after_failed_update(self, error: Exception) -> str:
        """vLLM's weight-transfer API after a failed update: resumed when provably nothing was
        written (``refused_before_write``: it serves its previous weights), else left paused
        (workers.vllm.engine): no request sees a mix of old and new weights. Returns
        ``error``'s message with what was done."""
        if refused_before_write(error):
            try:
                self.resume()
            except InferenceError as r:
                return f"{error}; refused before any write, but /resume failed: {r}"
            return f"{error}; refused before any write: vLLM resumed with its previous weights"
        return f"{error}; vLLM left paused (weights partly written): a complete update resumes it"


def refused_before_write(error: Exception) -> bool:
    """True when a failed update (``ckpt_engine.UpdateError``) provably wrote nothing: every
    parameter-server rank said that its worker was sent no bucket (``UpdateError.untouched``;
    e.g. a manifest refused by the workers, a P2P read refused by an owner before the first
    bucket). False when any rank may have sent one, or contact between the ranks was lost."""
    return bool(getattr(error, "untouched", False))
