"""A vLLM instance as a fork seed: the seed side, in each vLLM worker, and the client's calls to
it.

Route: vLLM's API server takes no routes from a plugin (general plugins run in every process but
are given no FastAPI app), and its weight-transfer engines only receive. What real vLLM does let
a package add to a running server is a worker extension (``--worker-extension-cls``) whose
methods ``POST /collective_rpc`` runs on every worker (vLLM's dev mode,
``VLLM_SERVER_DEV_MODE=1``). So the seed is our ``CkptEngineWorkerExtension`` and the three seed
calls of vLLM PR #27417 / SGLang are its methods:

| PR #27417 / SGLang route                      | here: ``/collective_rpc`` method  |
| (our server) GET /remote_instance_manifest    | ``ckpt_engine_fork_manifest``     |
| /init_weights_send_group_for_remote_instance  | ``ckpt_engine_fork_init``         |
| /send_weights_to_remote_instance              | ``ckpt_engine_fork_send``         |

Each worker answers for its TP rank (``results`` in rank order); the work is the reference
server's (``remote_instance.seed.WeightSender`` over a ``VllmCheckpointView``: pair groups, shard
mode at equal TP sizes, checkpoint tensors gathered over the seed's TP group otherwise). vLLM runs
a ``collective_rpc`` between engine steps: the seed keeps serving, its requests wait while a
send runs (about bytes / link bandwidth; the init only starts the rendezvous, which forms on a
background thread of each worker); a client that vanishes costs the seed at most the timeout the
client gave (each group's rendezvous and each transfer are bounded by it, capped at
``MAX_TIMEOUT_S``). Nothing is written on the seed. Failures are answered as
``{"success": false, "message"}`` (an exception would reach the client as a bare HTTP 500).

vLLM's dev routes take no API key (``--api-key`` guards ``/v1`` only): run seeds on a trusted
network, as vLLM's dev mode says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from workers.env import ENV
from workers.errors import RemoteInstanceError
from workers.remote_instance.manifest import Manifest, build_manifest
from workers.remote_instance.seed import WeightSender
from workers.remote_instance.seed_client import SeedAddress

logger = logging.getLogger(__name__)

RPC_PATH = "/collective_rpc"
MAX_TIMEOUT_S = 3600.0
MANIFEST, INIT, SEND = "ckpt_engine_fork_manifest", "ckpt_engine_fork_init", "ckpt_engine_fork_send"


class VllmSeed:
    """The seed side of one vLLM worker (held by the worker extension)."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.sender: WeightSender | None = None
        self.views: dict[str, Any] = {}  # group name -> the view its send will read

    def _view(self):
        from workers.vllm.checkpoint_view import VllmCheckpointView

        model = self.worker.model_runner.model
        return VllmCheckpointView(model, self.worker.model_config, effective=True)

    def manifest(self) -> dict:
        return {"success": True, "manifest": build_manifest(self._view()).to_json()}

    def init(self, *, master_address: str, ports: str, group_name: str, backend: str, timeout):
        timeout = min(float(timeout), MAX_TIMEOUT_S)
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        view = self._view()
        if self.sender is None:
            self.sender = WeightSender(
                None, view.tp, self.worker.device, timeout=timeout, delay=ENV.test_fork_delay_s
            )
        self.sender.timeout = timeout
        self.views.pop(group_name, None)
        self.sender.init_group(
            master_address=master_address, ports=ports, group_name=group_name, backend=backend
        )
        self.views[group_name] = view
        # the views of inits that the sender dropped (never sent within their timeout) go too
        self.views = {n: v for n, v in self.views.items() if n in self.sender.groups}
        return {"success": True}

    def send(self, *, master_address: str, ports: str, group_name: str) -> dict:
        if self.sender is None or group_name not in self.views:
            raise RemoteInstanceError(f"no send group {group_name!r} on this seed: call {INIT}")
        self.sender.model = self.views.pop(group_name)
        self.sender.delay = _test_delay()
        if self.sender.delay > 0:
            logger.warning("test delay: fork send started")
        try:
            result = self.sender.send(
                master_address=master_address, ports=ports, group_name=group_name
            )
        finally:
            self.sender.model = None  # the view's copies go with it
        return {"success": True, **result}


def _test_delay() -> float:
    """Tests only: seconds to pause after each tensor sent (CKPT_ENGINE_TEST_FORK_DELAY_S, or
    what the file CKPT_ENGINE_TEST_BUCKET_DELAY_FILE holds while it exists)."""
    path = ENV.test_bucket_delay_file
    if path is not None:
        try:
            return float(Path(path).read_text().strip() or 0)
        except FileNotFoundError:
            pass
    return ENV.test_fork_delay_s


def answer(method: str, call) -> dict:
    """Run one seed call; a failure becomes ``{"success": false, "message"}`` (logged)."""
    try:
        return call()
    except Exception as e:  # the RPC edge: the client gets the cause, not a bare HTTP 500
        logger.error("%s failed: %s: %s", method, type(e).__name__, e)
        return {"success": False, "message": f"{type(e).__name__}: {e}"}


@dataclass(frozen=True)
class VllmSeedClient(SeedAddress):
    """The client's calls to a vLLM seed (the interface of ``remote_instance.SeedClient``)."""

    def _rpc(self, method: str, kwargs: dict[str, str], read_timeout: float | None) -> list:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"method": method, "args": [], "kwargs": kwargs}
        where = f"seed {self.url}{RPC_PATH} {method}"
        try:
            r = requests.post(
                self.url + RPC_PATH,
                json=body,
                headers=headers,
                timeout=(self.timeout, read_timeout),
            )
        except requests.RequestException as e:
            raise RemoteInstanceError(f"{where}: {e}") from e
        if r.status_code != 200:
            hint = ""
            if r.status_code in (404, 500):
                hint = (
                    " (a vLLM seed runs with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls "
                    "workers.vllm.CkptEngineWorkerExtension)"
                )
            raise RemoteInstanceError(f"{where} answered {r.status_code}: {r.text[:300]}{hint}")
        try:
            results = r.json()["results"]
        except (ValueError, KeyError, TypeError) as e:
            raise RemoteInstanceError(f"{where}: malformed answer {r.text[:300]!r}") from e
        if not isinstance(results, list) or not results:
            raise RemoteInstanceError(f"{where}: malformed answer {r.text[:300]!r}")
        for rank, result in enumerate(results):
            if not isinstance(result, dict) or result.get("success") is not True:
                message = result.get("message") if isinstance(result, dict) else result
                raise RemoteInstanceError(f"{where} failed on seed rank {rank}: {message}")
        return results

    def manifest(self) -> Manifest:
        """Seed rank 0's manifest (every rank answers; their number is the seed's TP size)."""
        results = self._rpc(MANIFEST, {}, read_timeout=self.timeout)
        manifests = [Manifest.from_json(r.get("manifest")) for r in results]
        if manifests[0].tp_size != len(results):
            raise RemoteInstanceError(
                f"seed {self.url}: {len(results)} workers answered, its manifest says TP "
                f"{manifests[0].tp_size}"
            )
        return manifests[0]

    def init_group(self, *, ports: tuple[int, ...], group_name: str, backend: str) -> None:
        kwargs = {
            "master_address": self.ip,
            "ports": ",".join(map(str, ports)),
            "group_name": group_name,
            "backend": backend,
            "timeout": str(self.timeout),
        }
        # the seed's rendezvous waits up to `timeout` for this client's ranks
        self._rpc(INIT, kwargs, read_timeout=2 * self.timeout + 30)

    def send(self, *, ports: tuple[int, ...], group_name: str, read_timeout: float) -> dict:
        kwargs = {
            "master_address": self.ip,
            "ports": ",".join(map(str, ports)),
            "group_name": group_name,
        }
        results = self._rpc(SEND, kwargs, read_timeout=read_timeout)
        return {
            "mode": results[0]["mode"],
            "bytes": sum(r["bytes"] for r in results),
            "seconds": max(r["seconds"] for r in results),
            "weight_version": None,
        }

    def weights_info(self) -> dict:
        raise RemoteInstanceError(f"seed {self.url}: a vLLM seed has no /weights_info")
