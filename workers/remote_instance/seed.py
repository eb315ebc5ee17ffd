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
step.
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
    clients_of,
    fork_mode,
    pair_group_name,
    parse_ports,
)

logger = logging.getLogger(__name__)


@dataclass
class _Clients:
    """The groups of one client, formed on a background thread by the init."""

    ports: tuple[int, ...]
    deadline: float  # time.monotonic() by which the groups must form (and be sent through)
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
        return build_manifest(self.model).to_json() if self.tp.rank == 0 else None

    def init_group(self, *, master_address: str, ports: str, group_name: str, backend: str):
        try:
            port_list = parse_ports(ports)
        except ValueError as e:
            raise WorkersError(str(e)) from e
        impl = get_backend(backend)
        if impl.device_type != self.device.type:
            raise WorkersError(
                f"backend {backend!r} moves {impl.device_type} tensors; this seed is on "
                f"{self.device.type}"
            )
        self.drop(group_name)  # a client that re-initialises replaces its groups
        self._prune()
        clients = _Clients(ports=port_list, deadline=time.monotonic() + self.timeout)
        members = clients_of(self.tp.rank, self.tp.size, len(port_list))

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
            mode = fork_mode(self.tp.size, len(clients.ports))
            unformed = clients.wait()
            failure = None
            if unformed is not None:
                failure = RemoteInstanceError(f"fork {group_name}: {unformed}")
                failure.__cause__ = unformed
            if failure is None:
                logger.info("fork %s: sending (%s mode)", group_name, mode)
            start = time.perf_counter()
            if mode == SHARD:
                if failure is not None:
                    raise failure
                sent = self._send_parameters(clients)
            else:  # collective over the seed's ranks: iterate to the end even without groups
                sent = self._send_checkpoint(clients, failure)
            for group in clients.members:
                group.flush()
            seconds = time.perf_counter() - start  # every byte has landed
        except BaseException:
            clients.close()  # a failed transfer is aborted here, before the error is answered
            raise
        # Every byte has landed: the teardown (NCCL: ~0.5 s) runs in the background, so it does
        # not hold the front's lock (the seed's requests) nor delay the answer.
        close_later(clients.members, self.device)
        logger.info("fork %s: sent %d bytes (%s mode) in %.3f s", group_name, sent, mode, seconds)
        return {"mode": mode, "bytes": sent, "seconds": seconds}

    def _send_parameters(self, clients: _Clients) -> int:
        sent = 0
        for name, param in self.model.named_parameters():
            try:
                for group in clients.members:
                    group.send(param.data)
                    sent += param.data.nbytes
            except (TransferError, RuntimeError) as e:
                raise RemoteInstanceError(f"sending {name}: {e}") from e
            self._pause()
        return sent

    def _send_checkpoint(self, clients: _Clients, failure: BaseException | None) -> int:
        sent = 0
        for name, tensor in self.model.checkpoint_tensors():  # collective: iterate to the end
            if failure is not None:
                continue
            try:
                for group in clients.members:
                    group.send(tensor)
                    sent += tensor.nbytes
                    self._pause()
            except (TransferError, RuntimeError) as e:
                failure = RemoteInstanceError(f"sending {name}: {e}")
                failure.__cause__ = e
        if failure is not None:
            raise failure
        return sent

    def _pause(self) -> None:
        if self.delay > 0:
            time.sleep(self.delay)
