"""Seed side, on every server: the fork endpoints of the HTTP front (SGLang's payloads).

| route                                              | answers                                   |
| GET  /remote_instance_manifest                     | the `Manifest` JSON + the weight version  |
| POST /init_weights_send_group_for_remote_instance  | {success, message} once the groups started |
|                                                    | forming (they form in the background)     |
| POST /send_weights_to_remote_instance              | {success, message, weight_version, mode,  |
|                                                    |  bytes, bytes_per_client_rank, seconds}   |
|                                                    |  once everything was sent                 |
| GET  /get_remote_instance_transfer_engine_info     | Mooncake session + parameter addresses    |
|      (?rank=N: SGLang's one-rank shape)            | and layouts of every rank; generation     |

The transfer_engine info runs on the ranks under the lock too, but only to read addresses: the
client's reads then happen without the seed (one-sided), and `generation` (the tensors the
ranks' weight updates wrote so far) tells the client whether an update ran meanwhile.

All three need the API key (when the server has one). Each runs on every rank under the front's
FIFO lock: no weight update interleaves with a send, and generation requests wait while one runs
(a fork delays the seed's requests by its send). The init only starts the rendezvous, which
waits for the client on a background thread of each rank (`seed.WeightSender`): an init that no
client joins does not hold the lock; the send waits for the groups until the init's timeout. Init and send refuse while
the weights are not servable (503): a client never forks dummy or half-updated weights.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from workers.errors import RankDeadError, RankError, RankTimeoutError, RequestError
from workers.remote_instance.backend import TRANSFER_BACKENDS
from workers.remote_instance.plan import parse_ports
from workers.remote_instance.seed_client import INIT_PATH, MANIFEST_PATH, SEND_PATH, TE_INFO_PATH


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InitWeightsSendGroupRequest(_Strict):
    """SGLang's `InitWeightsSendGroupForRemoteInstanceReqInput`."""

    master_address: str = Field(min_length=1)
    ports: str
    group_rank: int
    world_size: int
    group_name: str = Field(default="weight_send_group", min_length=1, max_length=200)
    backend: str = "nccl"
    # ours (SGLang sends none): the client's layouts for slice mode (`slices.SliceRequest`)
    slices: dict[str, Any] | None = None


class SendWeightsRequest(_Strict):
    """SGLang's `SendWeightsToRemoteInstanceReqInput`."""

    master_address: str = Field(min_length=1)
    ports: str
    group_name: str = Field(default="weight_send_group", min_length=1, max_length=200)


def add_seed_routes(app: FastAPI, front, require_key) -> None:
    def failed(e: RankError) -> JSONResponse:
        """The method ran and failed on a rank (400); a dead or silent rank stays 503/504."""
        if isinstance(e, RankDeadError | RankTimeoutError):
            raise e
        return JSONResponse({"success": False, "message": str(e)}, status_code=400)

    @app.get(MANIFEST_PATH, dependencies=[Depends(require_key)])
    async def manifest() -> dict:
        values, version = await front.run_exclusive("remote_instance_manifest", {}, servable=False)
        return {**values[0], "weight_version": version}

    @app.get(TE_INFO_PATH, dependencies=[Depends(require_key)])
    async def transfer_engine_info(rank: int | None = None) -> JSONResponse:
        try:
            values, version = await front.run_exclusive(
                "remote_instance_transfer_engine_info", {}, servable=True
            )
        except RankError as e:
            return failed(e)
        if any(v is None for v in values):
            return JSONResponse(
                {
                    "success": False,
                    "message": "this seed does not serve the transfer_engine backend: start it "
                    "with --remote-instance-weight-loader-start-seed-via-transfer-engine",
                },
                status_code=400,
            )
        if rank is not None and not 0 <= rank < len(values):
            raise RequestError(f"rank {rank}: this seed has ranks 0..{len(values) - 1}")
        body = {
            "ranks": [{k: v for k, v in r.items() if k != "tensors_written"} for r in values],
            "tp_size": len(values),
            "weight_version": version,
            "generation": sum(r["tensors_written"] for r in values),
        }
        if rank is not None:
            body.update(
                {k: values[rank][k] for k in ("rank", "remote_instance_transfer_engine_info")}
            )
        return JSONResponse(body)

    @app.post(INIT_PATH, dependencies=[Depends(require_key)])
    async def init_group(req: InitWeightsSendGroupRequest) -> JSONResponse:
        _check_ports(req.ports)
        if req.world_size != 2 or req.group_rank != 0:
            raise RequestError(
                "this seed forms one two-rank group per client TP rank, as its rank 0: "
                f"world_size must be 2 and group_rank 0 (got {req.world_size}, {req.group_rank})"
            )
        if req.backend not in TRANSFER_BACKENDS:
            raise RequestError(
                f"backend {req.backend!r}: supported: {', '.join(TRANSFER_BACKENDS)} (a "
                "transfer_engine client reads one-sided: it forms no group)"
            )
        kwargs = req.model_dump(exclude={"group_rank", "world_size"})
        if req.slices is None:
            del kwargs["slices"]
        try:
            await front.run_exclusive("init_weights_send_group", kwargs, servable=True)
        except RankError as e:
            return failed(e)
        return JSONResponse(
            {"success": True, "message": f"send group {req.group_name} formed on every rank"}
        )

    @app.post(SEND_PATH, dependencies=[Depends(require_key)])
    async def send(req: SendWeightsRequest) -> JSONResponse:
        _check_ports(req.ports)
        try:
            values, version = await front.run_exclusive(
                "send_weights_to_remote_instance", req.model_dump(), servable=True
            )
        except RankError as e:
            front.metrics.fork_sent(None)
            return failed(e)
        sent = sum(v["bytes"] for v in values)
        front.metrics.fork_sent(sent)
        seconds = max(v["seconds"] for v in values)
        links = {j: n for v in values for j, n in v.get("links", {}).items()}
        body = {
            "success": True,
            "message": f"sent {sent} bytes in {seconds:.3f} s (weight version {version})",
            "weight_version": version,
            "mode": values[0]["mode"],
            "bytes": sent,
            "bytes_per_client_rank": dict(sorted(links.items(), key=lambda kv: int(kv[0]))),
            "seconds": seconds,
        }
        return JSONResponse(body)


def _check_ports(ports: str) -> None:
    try:
        parse_ports(ports)
    except ValueError as e:
        raise RequestError(f"ports: {e}") from e
