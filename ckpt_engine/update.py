"""Push a safetensors checkpoint into running inference servers: one parameter-server rank per GPU.

    torchrun --nproc-per-node 8 examples/update.py --checkpoint-path /models/Qwen3-8B \\
        --endpoint http://localhost:30000 --inference-parallel-size 8

Steps, on every rank (each step ends with a vote over all ranks, so a failure anywhere makes
every rank exit 1 naming the failed rank and its cause; bad flags exit 2):
1. split: the checkpoint's safetensors files (through model.safetensors.index.json when
   present) are shared across ranks balanced by bytes, deterministically (largest first, ties
   by name, onto the least-loaded rank): whole files when there are at least as many files as
   ranks and that split is within 10% of the tensor-level one, else single tensors;
2. register: each rank reads its share into host memory (`ParameterServer.register_checkpoint`;
   ``--register-mode overlap``: no separate step, the update registers, gathers and moves in one
   pass, reading the files while the buckets already read go to the GPUs, see
   ``ParameterServer.register_and_update``);
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
On SIGTERM (torchrun sends it to the surviving ranks when one dies) a rank cleans up and exits
143, within 5 s even when blocked in a collective (``leases.install_sigterm_cleanup``); what a
SIGKILLed rank leaves is removed by the next parameter server on the host.

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
With Redis, the metas travel through the registry instead of a file: ``--metas-registry
redis://... --publish-metas NAME`` on the running job, ``--metas-registry redis://...
--find-metas NAME --update-method p2p`` on the new one (it waits for them up to
``--ready-timeout``); the Redis key is as secret as the file (updater/metas_registry.py).
``all`` (broadcast, then P2P in one job) is not supported: run the two commands above.

``--watch DIR`` (instead of ``--checkpoint-path``): the updater stays up and pushes each new
complete checkpoint ``DIR/<name>/`` (its marker ``COMPLETE`` written last), keeping its ranks,
process group, server connection and pinned host memory; rank 0 decides what to push, SIGTERM
/ SIGINT stop it after the push in flight (143 / 130). See ckpt_engine/updater/watch.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ckpt_engine import CheckpointMetas, ParameterServer, leases
from ckpt_engine import env as ce_env
from ckpt_engine.device import resolve_device_type
from ckpt_engine.errors import UpdateError
from ckpt_engine.ps.collectives import ControlGroup
from ckpt_engine.updater.client import InferenceClient, InferenceError
from ckpt_engine.updater.config import ConfigError, UpdateArgs
from ckpt_engine.updater.metas_registry import MetasPublisher, find_metas
from ckpt_engine.updater.report import format_result, json_line, result_of
from ckpt_engine.updater.split import (
    Share,
    greedy_split,
    register_share,
    share_inputs,
    split_checkpoint,
)

# re-exported: the tests load this file and reach the parts through it
__all__ = ["ConfigError", "InferenceClient", "InferenceError", "UpdateArgs", "greedy_split"]

logger = logging.getLogger("ckpt_engine.examples.update")


# ---- the job ----------------------------------------------------------------------------------


@dataclass
class Job:
    args: UpdateArgs
    ps: ParameterServer
    control: ControlGroup
    client: InferenceClient
    timings: dict[str, float] = field(default_factory=dict)
    own_timings: dict[str, float] = field(default_factory=dict)  # this rank's, for --json-out

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
        self.own_timings[what] = seconds
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


def broadcast_update(job: Job, share: Share | None = None) -> None:
    """``share``: register it in the same pass (``--register-mode overlap``)."""
    name, args = job.args.checkpoint_name, job.args
    with weight_transfer_failures(job):
        if share is not None:
            try:
                files, named = share_inputs(share)
                job.ps.register_and_update(
                    name, job.req_func, files=files, named_tensors=named,
                    timeout=args.timeout, wire=args.wire,
                )  # fmt: skip
            except UpdateError:
                raise
            except Exception as e:  # e.g. a file changed after the split: no worker was sent
                if job.ps.last_step_reached_update:  # anything before the update (any rank:
                    raise  # the update's votes need every rank)
                raise UpdateError(f"{name!r} not registered: {e}", untouched=True) from e
        else:
            job.ps.update(name, job.req_func, timeout=args.timeout, wire=args.wire)


@contextmanager
def weight_transfer_failures(job: Job) -> Iterator[None]:
    """Around an update through vLLM's weight-transfer API (paused by ``update_steps``): on an
    UpdateError, each instance's first rank resumes its server when nothing was written, else
    leaves it paused, and says which in the error."""
    try:
        yield
    except UpdateError as e:
        if job.args.inference_api == "weight_transfer" and job.is_instance_head:
            raise UpdateError(job.client.after_failed_update(e)) from e
        raise


def p2p_update(job: Job) -> None:
    ranks = list(range(job.ps.world_size))  # every rank of this (new) job receives
    with weight_transfer_failures(job):
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


def pick_endpoint(endpoints: list[str], denv: ce_env.DistEnv, ips: int) -> str:
    """This rank's server: instances are blocks of `ips` consecutive ranks, each on one node
    (refused otherwise: IPC buffers and sockets are host-local). One endpoint serves every
    instance; as many as instances: one per instance in rank order; as many as instances per
    node: one per local instance (multi-node jobs, where c10d decides which node gets which
    ranks, give each node its own servers)."""
    if denv.world_size % ips:
        raise ConfigError(f"{denv.world_size} ranks do not split into instances of {ips}")
    if denv.local_world_size % ips:
        raise ConfigError(
            f"--inference-parallel-size {ips} does not divide the {denv.local_world_size} ranks "
            "per node: each instance's ranks must be on its node (IPC buffers and sockets are "
            "host-local)"
        )
    instances, local_instances = denv.world_size // ips, denv.local_world_size // ips
    if len(endpoints) == 1:
        return endpoints[0]
    if len(endpoints) == instances:
        return endpoints[denv.rank // ips]
    if len(endpoints) == local_instances:
        return endpoints[denv.local_rank // ips]
    raise ConfigError(
        f"{len(endpoints)} endpoints for {instances} instances ({local_instances} per node): "
        "give one, one per instance, or one per instance of this node"
    )


def owners_metas(args: UpdateArgs) -> CheckpointMetas:
    """A joining job's metas: from the file, or from the registry once published."""
    if args.load_metas_file is not None:
        return CheckpointMetas.load(args.load_metas_file)
    return find_metas(args.metas_registry, args.find_metas, timeout_s=args.ready_timeout)


def run(args: UpdateArgs) -> dict[str, Any]:
    preflight(args)
    denv = ce_env.dist_env()
    ips = args.inference_parallel_size
    endpoint = pick_endpoint(args.endpoints, denv, ips)
    ps = ParameterServer(device_type=resolve_device_type(args.device))
    publisher = None
    job: Job | None = None
    try:
        control = init_distributed(ps)
        client = InferenceClient(endpoint, uds=args.uds, api_key=args.api_key)
        job = Job(args=args, ps=ps, control=control, client=client)
        metas: list[CheckpointMetas] = []
        if args.load_metas_file is not None or args.find_metas is not None:  # P2P join
            mode = "p2p"
            job.step("register", lambda: metas.append(owners_metas(args)))
            ps.load_metas(metas[0])
            job.args = dataclasses.replace(args, checkpoint_name=metas[0].name)
        else:
            mode, shares = split_checkpoint(args.checkpoint_path, ps.world_size)
            share = shares[ps.rank]
            if args.register_mode == "overlap":  # registered by the update itself
                job.timings["register"] = 0.0
            else:
                job.step("register", lambda: register_share(ps, args.checkpoint_name, share))
        if job.is_instance_head:
            logger.info("rank %d: waiting for %s", ps.rank, endpoint)
        job.step("ready", lambda: job.is_instance_head and client.wait_ready(args.ready_timeout))
        if metas or args.register_mode == "overlap":
            job.timings["gather"] = 0.0
        else:
            job.step("gather", lambda: metas.append(ps.gather_metas(args.checkpoint_name)))
        if args.save_metas_file is not None and ps.rank == 0:
            metas[0].save(args.save_metas_file)
        if args.publish_metas is not None and ps.rank == 0:
            publisher = MetasPublisher(args.metas_registry, args.publish_metas, metas[0])
        time.sleep(args.sleep_time)
        update_steps(job, share if args.register_mode == "overlap" else None)
        if args.register_mode == "overlap":
            metas.append(ps.get_metas(args.checkpoint_name))
        result = result_of(job, metas[0], mode)
        own = None if mode == "p2p" else sum(metas[0].ranks[ps.rank].buffer_bytes)
        json_line(job, endpoint, result=result, rank_bytes=own, error=None)
        return result
    except Exception as e:
        json_line(job, endpoint, result=None, rank_bytes=None, error=e)
        raise
    finally:
        if publisher is not None:
            publisher.stop()
        ps.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def update_steps(job: Job, share: Share | None) -> None:
    """The update, voted: [pause], update (``share``: registered in the same pass, ``--register-mode
    overlap``), [resume]; pause and resume for vLLM's RL endpoints (``weight_transfer``)."""
    args, client, head = job.args, job.client, job.is_instance_head
    transfer = args.inference_api == "weight_transfer"
    if transfer:  # vLLM's RL endpoints: pause and open a session first
        job.step(
            "pause",
            lambda: head and client.begin_weight_transfer(wire=args.wire, timeout_s=args.timeout),
        )
    if share is not None:
        job.step("update", lambda: broadcast_update(job, share))
    else:
        job.step("update", lambda: UPDATE_DISPATCH[args.update_method](job))
    if transfer:
        job.step(
            "resume",
            lambda: (
                head
                and client.finish_weight_transfer(
                    version=args.weight_version, timeout_s=args.timeout
                )
            ),
        )


def main(argv: list[str] | None = None) -> int:
    args = UpdateArgs.from_cli(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [update rank {rank}] %(levelname)s %(message)s"
    )
    try:
        if args.watch is not None:
            from ckpt_engine.updater.watch import run_watch

            return run_watch(args, _stop_signals)
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


def cli() -> int:
    """The command: ``ckpt-engine-update``, ``python -m ckpt_engine.update``, ``torchrun ... -m
    ckpt_engine.update`` and ``examples/update.py``."""
    # SIGTERM (torchrun's stop; it sends it to the surviving ranks when one dies) becomes
    # SystemExit(143): `run`'s cleanup runs (published metas are withdrawn, host memory, IPC
    # buffers and sockets released); a rank blocked in a collective has its IPC buffers and
    # socket directory removed by a thread 5 s later and exits 143 all the same.
    # With --watch, SIGTERM and SIGINT become a stop request instead (updater/watch.py).
    global _stop_signals
    _stop_signals = leases.install_sigterm_cleanup(f"update.py rank {os.environ.get('RANK', '0')}")
    return main()


_stop_signals: leases.StopSignals | None = None  # installed by `cli`


if __name__ == "__main__":
    sys.exit(cli())
