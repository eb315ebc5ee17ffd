"""Seed side of a fork, in one rank process: open a transfer group per client rank it serves
(`init_group`), then stream the weights to them (`send`). See `plan` for who sends what.

`init_group` only starts the rendezvous: the groups form on a background thread of the rank,
so the rank goes on serving the front's commands (generation) while it waits for the client to
join; an init that no client ever joins costs the seed nothing but that thread, which gives up
after the timeout. `send` waits for the groups (until the init's deadline) and then streams.
Groups that were initialised but never sent within the timeout are dropped at the next init.

The rank reads its weights only (nothing is written, so a failed send leaves the seed serving
exactly as before). It runs as one `Call` under the front's FIFO lock: no update interleaves with
a send, and generation waits for it (the cost of a fork to the seed: its requests are delayed by
the send, about bytes / link bandwidth). In "full" mode every seed rank iterates the gathered
checkpoint tensors to the end even after its own transfer failed, so the seed's TP group stays in
step; in "slice" mode likewise every parameter the plan gathers (`slices`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from workers.errors import RemoteInstanceError, TransferError, WorkersError
from workers.remote_instance.backend import TransferGroup, close_later, get_backend
from workers.remote_instance.manifest import build_manifest
from workers.remote_instance.plan import (
    SHARD,
    SLICE,
    clients_of,
    fork_mode,
    pair_group_name,
    parse_ports,
)
from workers.remote_instance.slices import (
    ParamSlices,
    SliceRequest,
    layouts_of,
    plan_digest,
    plan_slices,
    seed_pieces,
)

logger = logging.getLogger(__name__)


@dataclass
class _Clients:
    """The groups of one client, formed on a background thread by the init."""

    ports: tuple[int, ...]
    deadline: float  # time.monotonic() by which the groups must form (and be sent through)
    ranks: list[int]  # the client ranks this seed rank serves, in the order of `members`
    slices: list[ParamSlices] | None = None  # slice mode: what each client rank receives
    members: list[TransferGroup] = field(default_factory=list)  # one group per client rank
    formed: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, group: TransferGroup) -> None:
        with self.lock:
            if not self.closed:
                self.members.append(group)
                return
        group.close()  # closed while it formed

    def close(self) -> None:
        with self.lock:
            self.closed = True
            members, self.members = self.members, []
        for group in members:
            group.close()

    def wait(self) -> BaseException | None:
        """None once every group formed; else why not (a failure, or the deadline)."""
        if not self.formed.wait(max(0.0, self.deadline - time.monotonic())):
            return TransferError("no client joined the send groups before the init's timeout")
        return self.error


class WeightSender:
    """The open send groups of one seed rank, by the client's group name."""

    def __init__(
        self, model, tp, device: torch.device, *, timeout: float, delay: float = 0.0
    ) -> None:
        self.model, self.tp, self.device = model, tp, device
        self.timeout = timeout
        self.delay = delay  # seconds between tensors: a test hook (CKPT_ENGINE_TEST_FORK_DELAY_S)
        self.groups: dict[str, _Clients] = {}

    def manifest(self) -> dict | None:
        if self.tp.rank != 0:
            return None
        return build_manifest(self.model, layouts=True).to_json()

    def init_group(
        self,
        *,
        master_address: str,
        ports: str,
        group_name: str,
        backend: str,
        slices: dict | None = None,
    ):
        try:
            port_list = parse_ports(ports)
        except ValueError as e:
            raise WorkersError(str(e)) from e
        plans = None
        if slices is not None and len(port_list) != self.tp.size:
            plans = self._slice_plan(SliceRequest.from_json(slices), len(port_list))
        impl = get_backend(backend)
        if impl.device_type != self.device.type:
            raise WorkersError(
                f"backend {backend!r} moves {impl.device_type} tensors; this seed is on "
                f"{self.device.type}"
            )
        self.drop(group_name)  # a client that re-initialises replaces its groups
        self._prune()
        members = clients_of(self.tp.rank, self.tp.size, len(port_list))
        clients = _Clients(
            ports=port_list,
            deadline=time.monotonic() + self.timeout,
            ranks=members,
            slices=plans,
        )

        def form() -> None:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            try:
                for j in members:
                    name = pair_group_name(group_name, port_list[j], j)
                    group = impl.connect(
                        master_address=master_address,
                        port=port_list[j],
                        group_rank=0,
                        group_name=name,
                        timeout=self.timeout,
                        device=self.device,
                    )
                    clients.add(group)
                logger.info("fork %s: %d group(s) open", group_name, len(members))
            except BaseException as e:  # reported by the send
                logger.warning("fork %s: the send groups did not form: %s", group_name, e)
                clients.error = e
                clients.close()
            finally:
                clients.formed.set()

        self.groups[group_name] = clients
        threading.Thread(target=form, name=f"fork-init-{group_name}", daemon=True).start()

    def _slice_plan(self, request: SliceRequest, client_tp: int) -> list[ParamSlices]:
        """What each client rank receives in slice mode; refused (before any group forms) when
        the client planned otherwise (its digest differs) or its TP size is not its ports'."""
        if request.tp_size != client_tp:
            raise WorkersError(
                f"slices: the client says TP size {request.tp_size} but gave {client_tp} ports"
            )
        named = list(self.model.named_parameters())
        plans = plan_slices(
            [n for n, _ in named],
            layouts_of(named),
            self.tp.size,
            request.layouts,
            client_tp,
        )
        if plan_digest(plans) != request.digest:
            raise WorkersError(
                "slices: the client's plan differs from this seed's (other versions of "
                "ckpt-engine?); fork with --remote-instance-weight-loader-whole-tensors"
            )
        return plans

    def _prune(self) -> None:
        """Drop the groups of inits whose deadline passed without a send."""
        now = time.monotonic()
        for name in [n for n, c in self.groups.items() if c.deadline < now]:
            logger.info("fork %s: no send within the timeout; its groups are dropped", name)
            self.drop(name)

    def drop(self, group_name: str) -> None:
        if (old := self.groups.pop(group_name, None)) is not None:
            old.close()

    def send(self, *, master_address: str, ports: str, group_name: str) -> dict:
        clients = self.groups.pop(group_name, None)
        if clients is None:
            raise WorkersError(
                f"no send group {group_name!r} on this seed: call "
                "/init_weights_send_group_for_remote_instance first"
            )
        try:
            if parse_ports(ports) != clients.ports:
                raise WorkersError(f"ports {ports!r} differ from those of the init call")
            mode = fork_mode(self.tp.size, len(clients.ports), slices=clients.slices is not None)
            unformed = clients.wait()
            failure = None
            if unformed is not None:
                failure = RemoteInstanceError(f"fork {group_name}: {unformed}")
                failure.__cause__ = unformed
            if failure is None:
                logger.info("fork %s: sending (%s mode)", group_name, mode)
            start = time.perf_counter()
            links = dict.fromkeys(clients.ranks, 0)  # bytes sent per client rank
            if mode == SHARD:
                if failure is not None:
                    raise failure
                self._send_parameters(clients, links)
            elif mode == SLICE:  # collective where a parameter is gathered: to the end
                self._send_slices(clients, links, failure)
            else:  # collective over the seed's ranks: iterate to the end even without groups
                self._send_checkpoint(clients, links, failure)
            sent = sum(links.values())
            for group in clients.members:
                group.flush()
            seconds = time.perf_counter() - start  # every byte has landed
        except BaseException:
            clients.close()  # a failed transfer is aborted here, before the error is answered
            raise
        # Every byte has landed: the teardown (NCCL: ~0.5 s) runs in the background, so it does
        # not hold the front's lock (the seed's requests) nor delay the answer.
        close_later(clients.members, self.device)
        per_link = ", ".join(f"client rank {j}: {n}" for j, n in links.items())
        logger.info(
            "fork %s: sent %d bytes (%s mode) in %.3f s (%s)",
            group_name,
            sent,
            mode,
            seconds,
            per_link,
        )
        return {
            "mode": mode,
            "bytes": sent,
            "seconds": seconds,
            "links": {str(j): n for j, n in links.items()},
        }

    def _send_parameters(self, clients: _Clients, links: dict[int, int]) -> None:
        for name, param in self.model.named_parameters():
            try:
                for j, group in zip(clients.ranks, clients.members, strict=True):
                    group.send(param.data)
                    links[j] += param.data.nbytes
            except (TransferError, RuntimeError) as e:
                raise RemoteInstanceError(f"sending {name}: {e}") from e
            self._pause()

    def _send_checkpoint(
        self, clients: _Clients, links: dict[int, int], failure: BaseException | None
    ) -> None:
        for name, tensor in self.model.checkpoint_tensors():  # collective: iterate to the end
            if failure is not None:
                continue
            try:
                for j, group in zip(clients.ranks, clients.members, strict=True):
                    group.send(tensor)
                    links[j] += tensor.nbytes
                    self._pause()
            except (TransferError, RuntimeError) as e:
                failure = RemoteInstanceError(f"sending {name}: {e}")
                failure.__cause__ = e
        if failure is not None:
            raise failure

    def _send_slices(
        self, clients: _Clients, links: dict[int, int], failure: BaseException | None
    ) -> None:
        """Slice mode: per parameter, each client rank's pieces (`slices`); a gathered
        parameter is gathered on every seed rank, even after a failure (collective)."""
        params = dict(self.model.named_parameters())
        for plan in clients.slices:
            param = params[plan.name]
            data = _raw(param.data)
            shards = self.tp.all_gather_list(data) if plan.gather else None
            if failure is not None:
                continue
            try:
                for j, group in zip(clients.ranks, clients.members, strict=True):
                    if plan.whole:  # the checkpoint tensors of this parameter
                        for full in param.shard_layout.unshard(shards or [data]).values():
                            group.send(full)
                            links[j] += full.nbytes
                    else:
                        for piece in seed_pieces(plan.per_rank[j], data, shards):
                            group.send(piece)
                            links[j] += piece.nbytes
                self._pause()
            except (TransferError, RuntimeError) as e:
                failure = RemoteInstanceError(f"sending {plan.name}: {e}")
                failure.__cause__ = e
        if failure is not None:
            raise failure

    def _pause(self) -> None:
        if self.delay > 0:
            time.sleep(self.delay)


_BYTE_FLOATS = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)
)


def _raw(data: torch.Tensor) -> torch.Tensor:
    """`data` as the collectives carry it (float8 as bytes: not every backend has it)."""
    return data.view(torch.uint8) if data.dtype in _BYTE_FLOATS else data
