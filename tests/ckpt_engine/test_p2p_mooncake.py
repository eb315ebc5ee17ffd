"""The Mooncake P2P transport, for real, over Mooncake's TCP protocol (the CI machine has no RDMA
device): when ``auto`` takes it (never without the operator's consent and an RDMA device), and a
named ``mooncake`` reading an owner's registered memory in another process (contiguous and
strided ranges), refusing a range outside it, and failing at once when the owner is gone."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from ckpt_engine import host_memory
from ckpt_engine.errors import TransferError
from ckpt_engine.p2p import mooncake, transport
from ckpt_engine.p2p.mooncake import MIN_RUN_BYTES, MooncakeTransport, default_protocol
from ckpt_engine.p2p.service import open_reader
from ckpt_engine.p2p.transport import ReadRange

SIZE = 3 << 20


def _pattern(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.int64) % 251).to(torch.uint8)


@pytest.fixture
def rdma_dir(tmp_path, monkeypatch):
    """An RDMA device listing the test controls (empty: no device)."""
    folder = tmp_path / "infiniband"
    folder.mkdir()
    monkeypatch.setenv("CKPT_ENGINE_RDMA_DEVICES_DIR", str(folder))
    monkeypatch.delenv("CKPT_ENGINE_MOONCAKE_PROTOCOL", raising=False)
    return folder


def test_mooncake_imports_here():
    assert transport.available()["mooncake"] is None, "scripts/setup.sh installs Mooncake"


def test_auto_never_takes_mooncake_without_consent(rdma_dir, monkeypatch):
    (rdma_dir / "mlx5_0").mkdir()  # even with an RDMA device
    monkeypatch.delenv("CKPT_ENGINE_MOONCAKE", raising=False)
    mooncake = MooncakeTransport()
    assert "CKPT_ENGINE_MOONCAKE=1" in mooncake.auto_unavailable()
    assert [t.name for t in transport.candidates("auto", ["mooncake", "tcp"], owner="o")] == ["tcp"]
    assert [t.name for t in transport.to_serve("auto")] == ["tcp"]
    # named explicitly, it runs (over TCP where there is no RDMA)
    assert [t.name for t in transport.candidates("mooncake", ["mooncake"], owner="o")] == [
        "mooncake"
    ]


def test_auto_takes_mooncake_only_with_rdma(rdma_dir, monkeypatch):
    monkeypatch.setenv("CKPT_ENGINE_MOONCAKE", "1")
    assert default_protocol() == "tcp"
    assert "no RDMA device" in MooncakeTransport().auto_unavailable()
    assert "mooncake" not in [t.name for t in transport.to_serve("auto")]
    with pytest.raises(TransferError, match="no RDMA device"):
        transport.candidates("auto", ["mooncake"], owner="o")
    (rdma_dir / "mlx5_0").mkdir()
    assert default_protocol() == "rdma"
    assert MooncakeTransport().auto_unavailable() is None
    monkeypatch.setenv("CKPT_ENGINE_MOONCAKE", "yes")
    with pytest.raises(ValueError, match="CKPT_ENGINE_MOONCAKE must be 0 or 1"):
        MooncakeTransport().auto_unavailable()


def _owner(conn) -> None:
    """Serve one buffer over Mooncake (TCP) until told to stop."""
    import os

    os.environ["CKPT_ENGINE_MOONCAKE_PROTOCOL"] = "tcp"
    buf = host_memory.create_anonymous(SIZE)
    buf.tensor.view(-1).copy_(_pattern(SIZE))
    server = MooncakeTransport.shared().serve("127.0.0.1", 0)
    conn.send(server.export("c", "unused-token", [buf]))
    conn.recv()  # stop
    server.close()


def test_named_mooncake_reads_over_tcp(monkeypatch):
    monkeypatch.setenv("CKPT_ENGINE_MOONCAKE_PROTOCOL", "tcp")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_owner, args=(child,), daemon=True)
    proc.start()
    try:
        assert parent.poll(120), "the owner did not start within 120 s"
        record = {"mooncake": parent.recv()}
        assert record["mooncake"]["protocol"] == "tcp"
        reader = open_reader(
            record, choice="mooncake", owner="owner rank 0", checkpoint="c", timeout_s=30
        )
        local = host_memory.create_anonymous(SIZE)
        reader.prepare([local])
        dst = local.memoryview()
        reader.read(
            [
                ReadRange(0, 0, 1 << 20, dst[: 1 << 20]),
                ReadRange(0, 2 << 20, 1 << 20, dst[1 << 20 : 2 << 20]),
            ]
        )
        want = _pattern(SIZE).numpy().tobytes()
        assert bytes(dst[: 1 << 20]) == want[: 1 << 20]
        assert bytes(dst[1 << 20 : 2 << 20]) == want[2 << 20 : 3 << 20]
        # a column shard of short runs (2500 of 64 bytes, 1024 apart): its span, one piece
        local.tensor.fill_(0xEE)
        span = 2499 * 1024 + 64
        moved = reader.read([ReadRange(0, 100, 64, dst[:span], count=2500, stride=1024)])
        assert moved == span and bytes(dst[:span]) == want[100 : 100 + span]
        # runs of MIN_RUN_BYTES and more: run by run, the gaps left alone (more runs than one
        # batch: 1100 of 1 KiB with a raised threshold)
        for run, count, stride in ((MIN_RUN_BYTES, 3, 3 * MIN_RUN_BYTES), (1024, 1100, 2048)):
            monkeypatch.setattr(mooncake, "MIN_RUN_BYTES", min(run, MIN_RUN_BYTES))
            local.tensor.fill_(0xEE)
            span = (count - 1) * stride + run
            moved = reader.read([ReadRange(0, 100, run, dst[:span], count=count, stride=stride)])
            assert moved == count * run
            got = bytes(dst[:span])
            for i in (0, 1, count - 1):
                a = i * stride
                assert got[a : a + run] == want[100 + a : 100 + a + run]
            assert got[run:stride] == b"\xee" * (stride - run)
        with pytest.raises(TransferError, match="range outside buffer 0"):
            reader.read([ReadRange(0, SIZE - 8, 16, dst[:16])])
        parent.send("stop")
        proc.join(60)
        with pytest.raises(TransferError, match=r"owner rank 0 at mooncake://127\.0\.0\.1"):
            reader.read([ReadRange(0, 0, 4096, dst[:4096])])
        reader.close()
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
