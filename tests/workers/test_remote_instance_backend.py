"""The transfer seam on CPU (gloo): a connected pair moves bytes, and `close_later` tears the
groups down off the caller's thread, safely alongside a `close()` from the caller."""

from __future__ import annotations

import threading

import pytest
import torch
from workers_testutil import free_port

from workers.remote_instance.backend import close_later, get_backend


def _pair():
    port, groups, errors = free_port(), {}, []

    def join(rank: int) -> None:
        try:
            groups[rank] = get_backend("gloo").connect(
                master_address="127.0.0.1",
                port=port,
                group_rank=rank,
                group_name="test-pair",
                timeout=30,
                device=torch.device("cpu"),
            )
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return groups[0], groups[1]


@pytest.mark.timeout(120)
def test_pair_moves_bytes_and_closes_in_the_background():
    seed, client = _pair()
    sent = torch.arange(1000, dtype=torch.float32)
    got = torch.zeros(1000, dtype=torch.float32)
    receiver = threading.Thread(target=client.recv, args=(got,))
    receiver.start()
    seed.send(sent)
    receiver.join(timeout=60)
    seed.flush()
    client.flush()
    assert torch.equal(got, sent)

    closer = close_later([seed, client], torch.device("cpu"))
    seed.close()  # the caller's own close meanwhile: one of the two does it, neither fails
    closer.join(timeout=60)
    assert not closer.is_alive()
    assert seed.pg is None and client.pg is None
    client.close()  # idempotent
