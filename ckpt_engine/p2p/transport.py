"""The P2P transport interface and its registry.

A transport moves byte ranges of an owner's registered host memory to a reader:

- owner side, ``Transport.serve(host, rank)`` -> ``OwnerServer``: serves in the background;
  ``export(checkpoint, token, buffers)`` returns the endpoint record that goes into the metas
  (plain JSON: what a reader needs to reach this rank), ``withdraw(checkpoint)`` stops serving
  it, ``close()`` stops the server.
- reader side, ``Transport.reader(record, owner=..., checkpoint=..., timeout_s=...)`` ->
  ``Reader``: ``read(ranges)`` fills local memory views and returns the bytes it moved;
  ``close()``.

Registered transports, in ``auto`` preference order: ``mooncake`` (RDMA, or its TCP protocol
when named) and ``tcp`` (portable, always available). ``auto`` takes a transport only where
``auto_unavailable()`` is None (Mooncake: allowed by the operator and an RDMA device present);
a named one needs only ``unavailable()`` to be None. ``candidates`` lists those a reader may
use, from what the owner offers and what runs here; an unknown name lists the supported ones, an
explicit one that cannot run lists the available ones.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ckpt_engine.errors import TransferError
from ckpt_engine.host_memory import HostBuffer
from ckpt_engine.planner import StridedRuns


@dataclass(frozen=True)
class ReadRange(StridedRuns):
    """``nbytes`` bytes at ``offset`` of the owner's buffer ``buffer`` into ``dst`` (writable,
    exactly ``span`` long, local host memory from ``Reader.prepare``). With ``count`` > 1:
    ``count`` runs of ``nbytes``, each ``stride`` bytes after the previous, on both sides (a
    column shard of a row-major tensor); the bytes between runs in ``dst`` are either left as
    they were or the owner's bytes there (a transport may read the whole span in one piece)."""

    buffer: int
    offset: int
    nbytes: int
    dst: memoryview
    count: int = 1
    stride: int = 0

    def runs(self):
        """(owner offset, dst offset) of each run."""
        return ((self.offset + i * self.stride, i * self.stride) for i in range(self.count))


class OwnerServer(abc.ABC):
    name: str

    @abc.abstractmethod
    def export(self, checkpoint: str, token: str, buffers: Sequence[HostBuffer]) -> dict[str, Any]:
        """Start serving ``buffers`` of ``checkpoint``; the endpoint record for the metas."""

    @abc.abstractmethod
    def withdraw(self, checkpoint: str) -> None:
        """Stop serving ``checkpoint`` (reads of it are refused from now on)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Reader(abc.ABC):
    def prepare(self, buffers: Sequence[HostBuffer]) -> None:  # noqa: B027 (optional hook)
        """Local buffers the reads will land in (a transport may need to register them)."""

    @abc.abstractmethod
    def read(self, ranges: Sequence[ReadRange]) -> int:
        """Fill every range; returns the bytes moved from the owner (each range's ``total``, or
        its ``span`` where read in one piece). TransferError (naming the owner) on failure or
        timeout."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Transport(abc.ABC):
    name: str

    @abc.abstractmethod
    def unavailable(self) -> str | None:
        """None if this transport can run in this process, else why not."""

    def auto_unavailable(self) -> str | None:
        """None if ``auto`` may choose this transport here, else why not (default: it runs)."""
        return self.unavailable()

    @abc.abstractmethod
    def serve(self, host: str, rank: int) -> OwnerServer: ...

    @abc.abstractmethod
    def reader(
        self, record: dict[str, Any], *, owner: str, checkpoint: str, timeout_s: float
    ) -> Reader: ...


def _tcp() -> Transport:
    from ckpt_engine.p2p.tcp import TcpTransport

    return TcpTransport()


def _mooncake() -> Transport:
    from ckpt_engine.p2p.mooncake import MooncakeTransport

    return MooncakeTransport.shared()


TRANSPORTS = {"mooncake": _mooncake, "tcp": _tcp}  # auto preference order
AUTO = "auto"


def get(name: str) -> Transport:
    if name not in TRANSPORTS:
        raise ValueError(
            f"unknown P2P transport {name!r}; supported: {AUTO}, {', '.join(TRANSPORTS)}"
        )
    return TRANSPORTS[name]()


def available() -> dict[str, str | None]:
    """Every transport -> None if it runs here, else the reason it does not."""
    return {name: get(name).unavailable() for name in TRANSPORTS}


def auto_choices() -> dict[str, str | None]:
    """Every transport -> None if ``auto`` takes it here, else the reason it does not."""
    return {name: get(name).auto_unavailable() for name in TRANSPORTS}


def to_serve(choice: str) -> list[Transport]:
    """The transports an owner serves: ``auto`` = every one ``auto`` takes here, else ``choice``."""
    if choice == AUTO:
        return [t for t in (get(n) for n in TRANSPORTS) if t.auto_unavailable() is None]
    transport = get(choice)
    why = transport.unavailable()
    if why is not None:
        raise TransferError(f"P2P transport {choice!r} cannot run here: {why}; {_listing()}")
    return [transport]


def candidates(choice: str, offered: Sequence[str], *, owner: str) -> list[Transport]:
    """The transports a reader may use to reach an owner offering ``offered``, best first
    (``auto``: every one offered and importable here; else exactly ``choice``)."""
    if choice != AUTO:
        get(choice)  # an unknown name lists the supported ones
    names = list(TRANSPORTS) if choice == AUTO else [choice]
    found, reasons = [], []
    for name in names:
        if name not in offered:
            reasons.append(f"{name}: not offered by the owner")
            continue
        transport = get(name)
        why = transport.auto_unavailable() if choice == AUTO else transport.unavailable()
        if why is None:
            found.append(transport)
        else:
            reasons.append(f"{name}: {why}")
    if not found:
        raise TransferError(
            f"no usable P2P transport ({choice}) to reach {owner} (it offers "
            f"{', '.join(offered) or 'none'}): {'; '.join(reasons)}; {_listing()}",
            owner=owner,
        )
    return found


def _listing() -> str:
    runs = [n for n, why in available().items() if why is None]
    return f"available here: {', '.join(runs) or 'none'}"
