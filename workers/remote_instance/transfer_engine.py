"""The `transfer_engine` backend (Mooncake): the seed registers its parameters' memory once; each
client rank reads what it keeps one-sided, so the seed's ranks take no part per client (no group,
no send, no lock held during a transfer) and any number of clients read at once.

Seed, in each rank (`TransferEngineSeed`, started with
`--remote-instance-weight-loader-start-seed-via-transfer-engine`, or as a modelexpress source):
the rank's Mooncake engine (one per process, `ckpt_engine.p2p.mooncake`) registers the memory of
every parameter, adjacent ones merged into one region, and nothing else (`registered_memory`). Weight updates write in
place, so the registration holds across them; `info` compares the regions with what is
registered and re-registers if storage moved. `info` is SGLang's
`remote_instance_transfer_engine_info`: `[session_id, {name: [ptr, numel, element_size]}]`,
plus what a client of another TP size needs: each parameter's shard layout.

Client, in each rank (`read_from_seed`): fetch every seed rank's info (one HTTP call), register
its own parameters, plan the reads (`reads.plan_parameter`: the whole parameter at equal TP
sizes, else only the rows it keeps), read them in batches per seed rank, zero padding rows. The
seed's front counts weight changes (`generation`); the client asks again after its reads, and
the client's TP ranks vote: if any rank saw a change (an update ran on the seed meanwhile), all
read again (`attempts`), so a client never keeps weights read across a seed update.

Trust: Mooncake has no authentication. Any process that reaches the seed's Mooncake port can
read, and write, the registered parameters (it checks only that an address lies in a registered
region); run seeds with this backend on a trusted fabric only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any

import torch

from workers.errors import RemoteInstanceError, WorkersError
from workers.remote_instance.reads import (
    LayoutMismatch,
    layout_from_json,
    layout_to_json,
    plan_parameter,
)
from workers.remote_instance.registered_memory import (
    Registration,
    mooncake_engine,
    param_regions,
    regions,
)

logger = logging.getLogger(__name__)

# `regions`: re-exported from registered_memory, where the memory both sides register lives
__all__ = [
    "BACKEND",
    "OneSeed",
    "TransferEngineSeed",
    "fork_one_sided",
    "regions",
    "start_seed_if_asked",
]

BACKEND = "transfer_engine"
# Ranges per Mooncake batch. Its TCP transport failed (EFAULT, -1) on one batch of ~2.2k ranges
# (a fork to another TP size of a 16-expert model: one range per row of each expert's down_proj);
# 2048 passed; 1024 keeps a margin.
BATCH_RANGES = 1024
BATCH_BYTES = 1 << 30  # bytes per Mooncake batch (each batch waits under the timeout)


class TransferEngineSeed:
    """One seed rank's registered parameters and the info clients read them with."""

    def __init__(self, model, tp, *, host: str) -> None:
        self.model, self.tp = model, tp
        self.transport, engine = mooncake_engine(host)
        self.registration = Registration(engine)
        self.start = time.perf_counter()
        self.registration.ensure(param_regions(self._params()))
        logger.info(
            "rank %d: transfer_engine seed: %d region(s), %.3f GB registered on %s in %.3f s",
            tp.rank,
            len(self.registration.regions),
            sum(n for _, n in self.registration.regions) / 1e9,
            self.transport.session(),
            time.perf_counter() - self.start,
        )

    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p.data for n, p in self.model.named_parameters()}

    def info(self) -> dict[str, Any]:
        params = self._params()
        if self.registration.ensure(param_regions(params)):
            logger.info("rank %d: parameter storage moved: registered again", self.tp.rank)
        weights = {n: [t.data_ptr(), t.numel(), t.element_size()] for n, t in params.items()}
        layouts = {n: layout_to_json(p.shard_layout) for n, p in self.model.named_parameters()}
        return {
            "rank": self.tp.rank,
            "remote_instance_transfer_engine_info": [self.transport.session(), weights],
            "layouts": layouts,
            "tp_size": self.tp.size,
        }

    def close(self) -> None:
        self.registration.close()


def start_seed_if_asked(args, model, tp) -> TransferEngineSeed | None:
    """A transfer_engine seed for this rank when the server is one (the flag, or a modelexpress
    source), started after the weights are loaded; else None."""
    settings = None
    if args.modelexpress_config is not None:
        from workers.remote_instance.coordination import ModelExpressConfig, advertised_host

        settings = ModelExpressConfig.parse(args.modelexpress_config, default_model=args.model_path)
    if not (
        args.remote_instance_weight_loader_start_seed_via_transfer_engine
        or (settings and settings.source)
    ):
        return None
    from workers.remote_instance.coordination import advertised_host

    return TransferEngineSeed(model, tp, host=advertised_host(args.host))


# -- client --------------------------------------------------------------------------------------


OK, CHANGED, FAILED = 0, 1, 2  # a rank's outcome of one read, as voted


def fork_one_sided(model, seeds, *, host_of, timeout: float, attempts: int = 3) -> dict[str, Any]:
    """Fill every parameter of this client rank one-sided from a seed that `seeds` names, then
    return {bytes, seconds, seed, weight_version, attempts} (the caller runs post-load processing
    once). Collective over the client's TP group: after each read the ranks vote; all keep the
    result only if every rank read it, from the same seed generation, unchanged during the read.
    A seed whose weights changed is read again (up to `attempts` times); a failure on any rank
    asks `seeds.next(failed)` for another seed (it raises RemoteInstanceError when none is
    left). `host_of(seed)`: this host's address towards the seed (Mooncake binds it)."""
    from workers.remote_instance.coordination import vote

    tp = model.tp
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    registration: Registration | None = None
    failed: dict[str, str] = {}
    try:
        while True:
            name, seed = seeds.next(failed)
            for attempt in range(1, attempts + 1):
                state, gen, error, stats = FAILED, -1, None, None
                try:
                    if registration is None:
                        registration = Registration(mooncake_engine(host_of(seed))[1])
                        registration.ensure(param_regions({n: p.data for n, p in params.items()}))
                    stats = _read_once(model, params, seed, registration.engine, timeout, device)
                    gen = stats["generation"]
                    state = OK if stats["generation_after"] == gen else CHANGED
                except WorkersError as e:  # this rank failed; the vote tells the others
                    error = str(e)
                    logger.warning("rank %d: reading from %s failed: %s", tp.rank, name, e)
                votes = vote(tp, device, state, gen)
                if all(v == (OK, votes[0][1]) for v in votes):
                    return {**stats, "seed": name, "url": seed.url, "attempts": attempt}
                if any(v[0] == FAILED for v in votes):
                    failed[name] = error or "failed on another rank"
                    break
                logger.warning(
                    "rank %d: seed %s changed its weights during the read (attempt %d of %d)",
                    tp.rank,
                    name,
                    attempt,
                    attempts,
                )
            else:
                failed[name] = f"its weights changed during each of {attempts} reads"
    finally:
        seeds.close()
        if registration is not None:
            registration.close()


def _read_once(model, params, seed, engine, timeout: float, device) -> dict[str, Any]:
    from workers.errors import ManifestMismatchError
    from workers.remote_instance.manifest import build_manifest

    manifest = seed.manifest()
    if problems := manifest.mismatches(build_manifest(model)):
        raise ManifestMismatchError(problems, seed.url)
    start = time.perf_counter()
    info = seed.transfer_engine_info()
    nbytes = _read_all(model, params, info, engine, seed.url, timeout)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    after = seed.transfer_engine_info(rank=0)
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "seed_tp": info["tp_size"],
        "weight_version": info.get("weight_version"),
        "generation": info["generation"],
        "generation_after": after["generation"],
    }


class OneSeed:
    """`seeds` for `fork_one_sided` with one seed given by address: no second chance."""

    def __init__(self, seed) -> None:
        self.seed = seed

    def next(self, failed: dict[str, str]):
        if failed:
            raise RemoteInstanceError(
                f"fork from seed {self.seed.url} failed: {failed[self.seed.url]}"
            )
        return self.seed.url, self.seed

    def close(self) -> None:
        pass


def _read_all(model, params, info, engine, url: str, timeout: float) -> int:
    tp = model.tp
    ranks = info["ranks"]
    seed_tp = info["tp_size"]
    if len(ranks) != seed_tp:
        raise RemoteInstanceError(f"seed {url}: info of {len(ranks)} ranks, TP size {seed_tp}")
    sessions = [r["remote_instance_transfer_engine_info"][0] for r in ranks]
    weights = [r["remote_instance_transfer_engine_info"][1] for r in ranks]
    batches: dict[int, list] = defaultdict(list)  # seed rank -> [(local, remote, n, name)]
    nbytes = 0
    for name, param in params.items():
        try:
            seed_layouts = [layout_from_json(r["layouts"][name]) for r in ranks]
            plan = plan_parameter(
                name,
                param.shard_layout,
                seed_layouts,
                itemsize=param.element_size(),
                client_rank=tp.rank,
            )
        except (KeyError, LayoutMismatch) as e:
            raise RemoteInstanceError(f"seed {url}: parameter {name}: {e}") from e
        local = param.data.data_ptr()
        for r in plan.reads:
            ptr, numel, size = weights[r.seed_rank][name]
            if size != param.element_size():
                raise RemoteInstanceError(
                    f"seed {url}: {name} has {size}-byte elements on seed rank {r.seed_rank}, "
                    f"{param.element_size()} here"
                )
            if r.remote + r.nbytes > numel * size:
                raise RemoteInstanceError(
                    f"seed {url}: {name} on seed rank {r.seed_rank} holds {numel * size} bytes, "
                    f"the plan reads up to {r.remote + r.nbytes}"
                )
            batches[r.seed_rank].append((local + r.local, ptr + r.remote, r.nbytes, name))
            nbytes += r.nbytes
        for z in plan.zeros:
            param.data.narrow(z.dim, z.start, z.length).zero_()
    from workers.env import ENV

    logger.info(
        "rank %d: reading %d bytes in %d range(s) from %s (TP %d), one-sided",
        tp.rank,
        nbytes,
        sum(len(v) for v in batches.values()),
        url,
        seed_tp,
    )
    delay = ENV.test_read_delay_s
    for rank, entries in sorted(batches.items()):
        for batch in _batches(entries, per_param=delay > 0):
            _read_batch(engine, sessions[rank], batch, f"seed {url} rank {rank}", timeout)
            if delay > 0:
                time.sleep(delay)  # tests only: a window to kill the seed mid-transfer
    return nbytes


def _batches(entries: list, *, per_param: bool = False):
    batch, size = [], 0
    for e in entries:
        full = len(batch) >= BATCH_RANGES or size + e[2] > BATCH_BYTES
        if batch and (full or (per_param and e[3] != batch[-1][3])):
            yield batch
            batch, size = [], 0
        batch.append(e)
        size += e[2]
    if batch:
        yield batch


def _read_batch(engine, session: str, batch: list, where: str, timeout: float) -> None:
    """One Mooncake batch read, bounded by `timeout` (a read that does not return in time is
    abandoned on its daemon thread and fails the fork)."""
    result: list = []

    def run() -> None:
        try:
            result.append(
                engine.batch_transfer_sync_read(
                    session, [e[0] for e in batch], [e[1] for e in batch], [e[2] for e in batch]
                )
            )
        except Exception as e:  # the binding raises on bad arguments
            result.append(e)

    thread = threading.Thread(target=run, name="te-read", daemon=True)
    thread.start()
    thread.join(timeout)
    names = f"{batch[0][3]} .. {batch[-1][3]}" if len(batch) > 1 else batch[0][3]
    total = sum(e[2] for e in batch)
    if not result:
        raise RemoteInstanceError(
            f"reading {total} bytes ({names}) from {where} at {session}: no answer within "
            f"{timeout:.0f} s"
        )
    if isinstance(result[0], Exception) or result[0] != 0:
        raise RemoteInstanceError(
            f"reading {total} bytes ({names}) from {where} at {session} failed "
            f"({result[0]!r}): the seed died, restarted or unregistered its memory"
        )
