"""Who sends what to whom in a fork (pure).

Groups: one two-rank group per client TP rank j, rendezvous on `ports[j]` at the seed's address
(the seed rank hosts the store, as group rank 0, the broadcast source; the client rank is group
rank 1). Client rank j is served by seed rank `server_of(j)`: `j * seed_tp // client_tp` when
the client's TP size is a multiple of the seed's (the seed rank that holds client rank j's rows
of every parameter sharded evenly: no gather in slice mode), else `j % seed_tp`. Each seed rank
serves ceil(client_tp / seed_tp) clients at most and, with equal TP sizes, rank i serves rank i.

Modes (the seed and the client derive the same one from the two TP sizes):
- "shard" (equal TP sizes): seed rank i sends its own parameters verbatim, by name in its
  manifest's `parameters` order, and client rank i receives them in place into the parameter of
  the same name: no gather, no copy, each byte crosses the link once.
- "slice" (different TP sizes, both layouts known: a reference seed lists its layouts in its
  manifest, the client sends its own with the init call): each client rank receives only the
  rows/columns of each parameter it keeps, as pieces (`slices`), straight into its parameters;
  the seed gathers a parameter over its TP group only where a piece lies on another seed rank.
  A TP=2 client of a TP=1 seed moves half of each sharded tensor per rank.
- "full" (different TP sizes, a layout unknown: a vLLM seed or client, or
  `--remote-instance-weight-loader-whole-tensors`): every seed rank iterates
  `checkpoint_tensors()` (gathered over the seed's TP group, in checkpoint layout) and sends
  each full tensor to its clients, in the manifest's `tensors` order; each client rank keeps its
  slice through `model.load_weights` (each client rank receives the whole model).
"""

from __future__ import annotations

from ckpt_engine import json_depth

SHARD = "shard"
SLICE = "slice"
FULL = "full"


def fork_mode(seed_tp: int, client_tp: int, *, slices: bool = False) -> str:
    """The mode both ends use; `slices`: the client asked for slice mode (init's `slices`)."""
    if seed_tp == client_tp:
        return SHARD
    return SLICE if slices else FULL


def server_of(client_rank: int, seed_tp: int, client_tp: int) -> int:
    """The seed rank that serves client rank `client_rank` (module doc)."""
    if client_tp % seed_tp == 0:
        return client_rank * seed_tp // client_tp
    return client_rank % seed_tp


def clients_of(seed_rank: int, seed_tp: int, client_tp: int) -> list[int]:
    """The client ranks that seed rank `seed_rank` sends to."""
    return [j for j in range(client_tp) if server_of(j, seed_tp, client_tp) == seed_rank]


def pair_group_name(base: str, port: int, client_rank: int) -> str:
    """The name of one pair group (SGLang's `f"{group_name}_{port}_{tp_rank}"`)."""
    return f"{base}_{port}_{client_rank}"


def parse_ports(value: object) -> tuple[int, ...]:
    """Ports as SGLang spells them: a JSON list ("[30001, 30002]") or "30001,30002"; ValueError
    names the problem (not a list, a bad or repeated port)."""
    if isinstance(value, list | tuple):
        items = list(value)
    else:
        text = str(value).strip()
        if text.startswith("["):
            try:
                items = json_depth.loads(text, what="ports", max_depth=1)
            except json_depth.JsonDepthError as e:
                raise ValueError(f"{e} (a flat list of port numbers)") from None
            except ValueError as e:
                raise ValueError(f"ports {text[:200]!r} are not a JSON list: {e}") from None
            if not isinstance(items, list):
                raise ValueError(f"ports {text[:200]!r} are not a list")
        else:
            items = [p.strip() for p in text.split(",") if p.strip()]
    try:
        ports = tuple(int(p) for p in items)
    except (TypeError, ValueError):
        raise ValueError(f"ports {str(value)[:200]!r}: not all integers") from None
    if not ports:
        raise ValueError("no ports given")
    if bad := [p for p in ports if not 0 < p < 65536]:
        raise ValueError(f"ports out of 1..65535: {bad}")
    if len(set(ports)) != len(ports):
        raise ValueError(f"ports repeat: {list(ports)}")
    return ports
