"""Push a safetensors checkpoint into running inference servers: one parameter-server rank per GPU.

    torchrun --nproc-per-node 8 examples/update.py --checkpoint-path /models/Qwen3-8B \\
        --endpoint http://localhost:30000 --inference-parallel-size 8

Steps, on every rank (each step ends with a vote over all ranks, so a failure anywhere makes
every rank exit 1 naming the failed rank and its cause; bad flags exit 2):
1. split: the checkpoint's safetensors files (through model.safetensors.index.json when
   present) are shared across ranks balanced by bytes, deterministically (largest first, ties
   by name, onto the least-loaded rank): whole files when there are at least as many files as
   ranks and that split is within 10% of the tensor-level one, else single tensors;
2. register: each rank reads its share into host memory (`ParameterServer.register_checkpoint`);
3. ready: the first rank of each inference instance waits for the server's ``/ping``;
4. gather: every rank learns what every rank holds (``gather_metas``; ``--save-metas-file``);
5. update (``--update-method``): the parameter server streams the checkpoint into every GPU's
   colocated worker; the first rank of each instance of ``--inference-parallel-size`` ranks
   triggers its server with the socket addresses of that instance's GPUs, through
   ``POST /collective_rpc {"method": "update_weights_from_ipc", "args": [{key: addr}]}`` (vLLM
   shape, the default) or ``POST /update_weights_from_ipc {"zmq_handles", "weight_version"}``
   (SGLang shape; the only one that carries ``--weight-version``). A server that answers with
   an error fails the update on every rank.
Rank 0 prints the timings (register and gather: the slowest rank) and GB/s of the update.

``--wire upstream`` speaks the upstream checkpoint-engine 0.4.x protocol to the workers, for
SGLang / vLLM servers that run upstream's ``checkpoint_engine.worker`` (pickled messages on a
predictable abstract socket: use it only where every local process is trusted).

P2P (new instances join running ones, issue 9): the running job saves its metas with
``--save-metas-file F`` and stays up (``--sleep-time``) while its ranks serve their host memory;
a new job runs ``--load-metas-file F --update-method p2p`` (no ``--checkpoint-path``): it
registers nothing (step 2 loads the metas file instead; no gather), and every rank of the new
job pulls its buckets straight from the owners' host memory (``ParameterServer.update(...,
ranks=all ranks of this job)``), then hands them to its servers as in broadcast. F carries the
owners' addresses and secret tokens: protect it like a key (it is written mode 0600).
``all`` (broadcast, then P2P in one job) is not supported: run the two commands above.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import requests
import torch
import torch.distributed as dist
from requests.adapters import HTTPAdapter
from safetensors import safe_open
from urllib3 import HTTPConnectionPool
from urllib3.connection import HTTPConnection

from ckpt_engine import CheckpointMetas, ParameterServer
from ckpt_engine import env as ce_env
from ckpt_engine.compat import WIRES
from ckpt_engine.device import resolve_device_type
from ckpt_engine.ps.collectives import ControlGroup
from ckpt_engine.safetensors_io import read_header

logger = logging.getLogger("ckpt_engine.examples.update")

UPDATE_METHODS = ("broadcast", "p2p", "all")
INFERENCE_APIS = ("collective_rpc", "update_weights_from_ipc")
FILE_SPLIT_SLACK = 1.10  # whole files when their split is at most 10% worse than per-tensor


class ConfigError(ValueError):
    """Flags that cannot work together (exit 2)."""


class InferenceError(RuntimeError):
    """The inference server refused or failed the update, or never answered."""


def _opt(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


@dataclass(frozen=True, kw_only=True)
class UpdateArgs:
    checkpoint_path: str | None = field(
        default=None, metadata=_opt("folder of *.safetensors (+ model.safetensors.index.json)")
    )
    endpoint: str = field(
        default="http://localhost:19730",
        metadata=_opt("inference server URL; a comma-separated list gives one per instance"),
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
    inference_api: str = field(
        default="collective_rpc",
        metadata=_opt(
            "collective_rpc: vLLM's POST /collective_rpc; update_weights_from_ipc: SGLang's",
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

    def __post_init__(self) -> None:
        if self.inference_parallel_size < 1:
            raise ConfigError("--inference-parallel-size must be >= 1")
        if self.checkpoint_path is None and self.load_metas_file is None:
            raise ConfigError("give --checkpoint-path (or --load-metas-file)")
        if (self.update_method == "p2p") != (self.load_metas_file is not None):
            raise ConfigError("--update-method p2p and --load-metas-file go together")
        if self.wire != "ckpt-engine" and self.update_method != "broadcast":
            raise ConfigError("--wire upstream works with --update-method broadcast only")
        if self.checkpoint_path is not None and self.load_metas_file is not None:
            raise ConfigError(
                "--load-metas-file joins with the owners' checkpoint: no --checkpoint-path"
            )
        if self.weight_version is not None and self.inference_api != "update_weights_from_ipc":
            raise ConfigError(
                "--weight-version needs --inference-api update_weights_from_ipc "
                "(vLLM's /collective_rpc carries no version)"
            )
        for name in ("timeout", "ready_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.sleep_time < 0:
            raise ConfigError("--sleep-time must be >= 0")
        for url in self.endpoints:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"--endpoint {url!r} must start with http:// or https://")

    @property
    def endpoints(self) -> list[str]:
        return [e.strip().rstrip("/") for e in self.endpoint.split(",") if e.strip()]

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> UpdateArgs:
        parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
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


# ---- the split: which rank registers what (pure, the same on every rank) ----------------------


@dataclass(frozen=True)
class Share:
    """What one rank registers: whole files, or single tensors as (file, name)."""

    files: tuple[str, ...] = ()
    tensors: tuple[tuple[str, str], ...] = ()
    nbytes: int = 0


def greedy_split(items: list[tuple[str, int]], world: int) -> list[tuple[list[str], int]]:
    """Largest first (ties by key) onto the least-loaded rank (ties: the lowest rank)."""
    out: list[tuple[list[str], int]] = [([], 0) for _ in range(world)]
    for key, nbytes in sorted(items, key=lambda kv: (-kv[1], kv[0])):
        rank = min(range(world), key=lambda r: (out[r][1], r))
        out[rank] = (out[rank][0] + [key], out[rank][1] + nbytes)
    return out


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def split_checkpoint(path: str | Path, world: int) -> tuple[str, list[Share]]:
    """("files" | "tensors", one Share per rank), balanced by bytes; see the module docstring."""
    tensors: dict[str, tuple[str, int]] = {}
    sizes: list[tuple[str, int]] = []
    for file in checkpoint_files(Path(path)):
        header = read_header(str(file))
        sizes.append((str(file), sum(t.nbytes for t in header.tensors)))
        for t in header.tensors:
            if t.name in tensors:
                raise ValueError(f"tensor {t.name} is in both {tensors[t.name][0]} and {file}")
            tensors[t.name] = (str(file), t.nbytes)
    by_tensor = greedy_split([(n, b) for n, (_, b) in tensors.items()], world)
    if len(sizes) >= world:
        by_file = greedy_split(sizes, world)
        if max(b for _, b in by_file) <= FILE_SPLIT_SLACK * max(b for _, b in by_tensor):
            return "files", [Share(files=tuple(sorted(fs)), nbytes=b) for fs, b in by_file]
    shares = [
        Share(tensors=tuple(sorted((tensors[n][0], n) for n in names)), nbytes=b)
        for names, b in by_tensor
    ]
    return "tensors", shares


def register_share(ps: ParameterServer, name: str, share: Share) -> None:
    named: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for file, tensor in share.tensors:
        by_file.setdefault(file, []).append(tensor)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            named.update((n, f.get_tensor(n)) for n in names)
    ps.register_checkpoint(name, files=list(share.files), named_tensors=named)


# ---- the inference server's HTTP API (TCP or unix socket) -----------------------------------


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


# ---- the job ----------------------------------------------------------------------------------


@dataclass
class Job:
    args: UpdateArgs
    ps: ParameterServer
    control: ControlGroup
    client: InferenceClient
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.ps.rank

    @property
    def is_instance_head(self) -> bool:
        return self.rank % self.args.inference_parallel_size == 0

    def req_func(self, socket_paths: list[tuple[str, str]]) -> None:
        """Run by the parameter server on every rank; the first of each instance sends."""
        if not self.is_instance_head:
            return
        ips = self.args.inference_parallel_size
        handles = dict(socket_paths[self.rank : self.rank + ips])
        self.client.update(
            handles,
            api=self.args.inference_api,
            version=self.args.weight_version,
            timeout_s=self.args.timeout,
        )

    def step(self, what: str, fn: Callable[[], object]) -> float:
        """Run ``fn`` on every rank, then vote: the slowest rank's seconds, or raise everywhere."""
        start = time.perf_counter()
        error = None
        try:
            fn()
        except Exception as e:
            logger.debug("rank %d: %s failed", self.rank, what, exc_info=True)
            error = f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - start
        limit = max(self.ps.config.init_timeout_s, self.args.timeout, self.args.ready_timeout)
        votes = self.control.all_gather_json(
            {"error": error, "seconds": seconds}, timeout_s=limit, what=what
        )
        by_error: dict[str, list[int]] = {}
        for r, v in enumerate(votes):
            if v["error"] is not None:
                by_error.setdefault(v["error"], []).append(r)
        if by_error:
            causes = "; ".join(f"rank(s) {rs}: {e}" for e, rs in by_error.items())
            raise RuntimeError(f"{what} failed on {causes}")
        self.timings[what] = max(v["seconds"] for v in votes)
        return self.timings[what]


def broadcast_update(job: Job) -> None:
    job.ps.update(
        job.args.checkpoint_name, job.req_func, timeout=job.args.timeout, wire=job.args.wire
    )


def p2p_update(job: Job) -> None:
    ranks = list(range(job.ps.world_size))  # every rank of this (new) job receives
    job.ps.update(job.args.checkpoint_name, job.req_func, ranks=ranks, timeout=job.args.timeout)


# The one place the update method is dispatched (`preflight` refuses what is not built yet).
UPDATE_DISPATCH: dict[str, Callable[[Job], None]] = {
    "broadcast": broadcast_update,
    "p2p": p2p_update,
    "all": lambda job: (broadcast_update(job), p2p_update(job)),  # refused by preflight
}


def preflight(args: UpdateArgs) -> None:
    """Refuse, before any work, what this updater cannot do yet (exit 2)."""
    if args.update_method == "all":
        raise ConfigError(
            "--update-method all is not supported: run broadcast (with --save-metas-file) on "
            "the running instances and p2p (with --load-metas-file) on the new ones"
        )


def init_distributed(ps: ParameterServer) -> ControlGroup:
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if ps.device_type == "cuda" else "gloo"
        port = ps.env.master_port
        if port is None:
            if ps.world_size > 1:
                raise ConfigError("MASTER_PORT is not set: run under torchrun")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        dist.init_process_group(
            backend,
            init_method=f"tcp://{ps.env.master_addr}:{port}",
            rank=ps.rank,
            world_size=ps.world_size,
            timeout=timedelta(seconds=ps.config.init_timeout_s),
        )
    group = dist.new_group(backend="gloo")
    return ControlGroup(group, rank=ps.rank, world_size=ps.world_size)


def run(args: UpdateArgs) -> dict[str, Any]:
    preflight(args)
    denv = ce_env.dist_env()
    ips = args.inference_parallel_size
    if denv.world_size % ips:
        raise ConfigError(f"{denv.world_size} ranks do not split into instances of {ips}")
    endpoints = args.endpoints
    if len(endpoints) not in (1, denv.world_size // ips):
        raise ConfigError(f"{len(endpoints)} endpoints for {denv.world_size // ips} instances")
    ps = ParameterServer(device_type=resolve_device_type(args.device))
    try:
        control = init_distributed(ps)
        endpoint = endpoints[min(ps.rank // ips, len(endpoints) - 1)]
        client = InferenceClient(endpoint, uds=args.uds, api_key=args.api_key)
        job = Job(args=args, ps=ps, control=control, client=client)
        metas: list[CheckpointMetas] = []
        if args.load_metas_file is not None:  # P2P join: the owners' metas instead of a share
            mode = "p2p"
            job.step("register", lambda: metas.append(CheckpointMetas.load(args.load_metas_file)))
            ps.load_metas(metas[0])
            job.args = dataclasses.replace(args, checkpoint_name=metas[0].name)
        else:
            mode, shares = split_checkpoint(args.checkpoint_path, ps.world_size)
            share = shares[ps.rank]
            job.step("register", lambda: register_share(ps, args.checkpoint_name, share))
        if job.is_instance_head:
            logger.info("rank %d: waiting for %s", ps.rank, endpoint)
        job.step("ready", lambda: job.is_instance_head and client.wait_ready(args.ready_timeout))
        if metas:
            job.timings["gather"] = 0.0
        else:
            job.step("gather", lambda: metas.append(ps.gather_metas(args.checkpoint_name)))
        if args.save_metas_file is not None and ps.rank == 0:
            metas[0].save(args.save_metas_file)
        time.sleep(args.sleep_time)
        job.step("update", lambda: UPDATE_DISPATCH[args.update_method](job))
        nbytes = metas[0].nbytes
        return {
            "bytes": nbytes,
            "tensors": metas[0].num_tensors,
            "ranks": ps.world_size,
            "split": mode,
            "device": ps.device_type,
            "register_s": job.timings["register"],
            "gather_s": job.timings["gather"],
            "update_s": job.timings["update"],
            "update_gb_s": nbytes / job.timings["update"] / 1e9,
        }
    finally:
        ps.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def format_result(r: dict[str, Any]) -> str:
    return (
        f"ckpt-engine update: {r['bytes']} bytes ({r['tensors']} tensors, split by "
        f"{r['split']} over {r['ranks']} {r['device']} ranks): register {r['register_s']:.3f} s, "
        f"gather {r['gather_s']:.3f} s, update {r['update_s']:.3f} s "
        f"({r['update_gb_s']:.3f} GB/s)"
    )


def main(argv: list[str] | None = None) -> int:
    args = UpdateArgs.from_cli(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [update rank {rank}] %(levelname)s %(message)s"
    )
    try:
        result = run(args)
    except ConfigError as e:
        print(f"update.py rank {rank}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"update.py rank {rank}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if rank == "0":
        print(format_result(result), flush=True)
        if args.result_file is not None:
            Path(args.result_file).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
