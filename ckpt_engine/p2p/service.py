"""Both ends of P2P as the parameter server uses them.

Owner: ``OwnerService`` (one per ParameterServer) starts the chosen transports' servers on first
use and publishes each checkpoint with a fresh token (``secrets.token_hex(16)``); the record it
returns goes into that rank's metas (``RankMetas.p2p``). ``withdraw`` on unregister, ``close``
with the server. Reader: ``open_reader`` picks a transport for one owner from its record,
falling back in ``auto`` mode when one fails to start.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
from collections.abc import Sequence
from typing import Any

from ckpt_engine.errors import TransferError
from ckpt_engine.host_memory import HostBuffer
from ckpt_engine.p2p import transport as transports
from ckpt_engine.p2p.transport import OwnerServer, Reader

logger = logging.getLogger(__name__)


def local_address(master_addr: str) -> str:
    """This host's address on the route to ``master_addr`` (the rendezvous host), so that a
    multi-node job publishes an address the other nodes reach; loopback stays loopback."""
    try:
        if ipaddress.ip_address(socket.gethostbyname(master_addr)).is_loopback:
            return "127.0.0.1"
    except (OSError, ValueError):
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_addr, 9))  # no packet is sent; this only picks the route
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


class OwnerService:
    def __init__(self, *, host: str, rank: int, choice: str) -> None:
        self.host, self.rank, self.choice = host, rank, choice
        self._servers: list[OwnerServer] | None = None
        self._published: dict[str, dict[str, Any]] = {}

    def _start(self) -> list[OwnerServer]:
        if self._servers is None:
            servers = []
            for t in transports.to_serve(self.choice):
                try:
                    servers.append(t.serve(self.host, self.rank))
                except TransferError as e:
                    if self.choice != transports.AUTO:
                        raise
                    logger.warning("rank %d: P2P %s not served: %s", self.rank, t.name, e)
            self._servers = servers
        return self._servers

    def publish(self, checkpoint: str, buffers: Sequence[HostBuffer]) -> dict[str, Any]:
        """Serve ``checkpoint`` (once; later calls return the same record)."""
        if checkpoint not in self._published:
            token = secrets.token_hex(16)
            self._published[checkpoint] = {
                s.name: s.export(checkpoint, token, buffers) for s in self._start()
            }
        return self._published[checkpoint]

    def withdraw(self, checkpoint: str) -> None:
        if self._published.pop(checkpoint, None) is not None:
            for s in self._servers or ():
                s.withdraw(checkpoint)

    def close(self) -> None:
        for s in self._servers or ():
            s.close()
        self._servers = None
        self._published.clear()


def open_reader(
    record: dict[str, Any] | None,
    *,
    choice: str,
    owner: str,
    checkpoint: str,
    timeout_s: float,
) -> Reader:
    """A reader of ``owner``'s memory through the best transport both sides run."""
    if not record:
        raise TransferError(
            f"{owner} publishes no P2P endpoint in the metas (saved before P2P serving, "
            "or with p2p_serve off)",
            owner=owner,
        )
    errors = []
    for t in transports.candidates(choice, list(record), owner=owner):
        try:
            return t.reader(record[t.name], owner=owner, checkpoint=checkpoint, timeout_s=timeout_s)
        except TransferError as e:
            if choice != transports.AUTO:
                raise
            logger.warning("P2P %s to %s unusable, trying the next transport: %s", t.name, owner, e)
            errors.append(f"{t.name}: {e}")
    raise TransferError(f"no P2P transport reached {owner}: {'; '.join(errors)}", owner=owner)
