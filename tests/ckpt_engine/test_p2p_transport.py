"""The P2P wire (pure) and the portable tcp transport in one process: reads, refusals, timeouts,
withdrawal, transport choice."""

from __future__ import annotations

import json
import logging
import socket
import threading

import pytest
import torch
import zmq

from ckpt_engine import host_memory
from ckpt_engine.errors import ProtocolError, ReadRefused, TransferError
from ckpt_engine.p2p import protocol, transport
from ckpt_engine.p2p.service import OwnerService, local_address, open_reader
from ckpt_engine.p2p.tcp import TcpReader, TcpServer
from ckpt_engine.p2p.transport import ReadRange

TOKEN = "a" * 32


def _req(**kw) -> protocol.ReadRequest:
    base = dict(id=1, token=TOKEN, checkpoint="c", buffer=0, offset=0, length=10)
    return protocol.ReadRequest(**{**base, **kw})


EXPORTS = {"c": protocol.Export(TOKEN, (100, 0, 50))}


# -- wire and authorization (pure) ----------------------------------------------------------------
@pytest.mark.parametrize(
    "msg",
    [_req(), protocol.DataReply(id=3, length=7), protocol.ErrorReply(id=2, code="x", message="m")],
)
def test_round_trip(msg):
    assert protocol.decode(protocol.encode(msg)) == msg


@pytest.mark.parametrize(
    "data,text",
    [
        (b"\xff", "not JSON"),
        (b"[]", "not a ckpt-engine-p2p"),
        (json.dumps({"protocol": "ckpt-engine-p2p", "v": 2, "type": "read"}).encode(), "version"),
        (json.dumps({"protocol": "ckpt-engine-p2p", "v": 1, "type": "eval"}).encode(), "type"),
        (protocol.encode(_req()).replace(b'"offset":0', b'"offset":-1'), "negative"),
        (protocol.encode(_req()).replace(b'"buffer":0', b'"buffer":true'), "buffer"),
        (protocol.encode(_req()).replace(b'"length":10', b'"length":"10"'), "length"),
        (b" " * (protocol.MAX_HEADER_BYTES + 1), "exceeds"),
    ],
)
def test_decode_rejects(data, text):
    with pytest.raises(ProtocolError, match=text):
        protocol.decode(data)


@pytest.mark.parametrize(
    "req,code",
    [
        (_req(), None),
        (_req(offset=90, length=10), None),
        (_req(buffer=1, length=0), None),
        (_req(token="b" * 32), protocol.BAD_TOKEN),
        (_req(token=""), protocol.BAD_TOKEN),
        (_req(checkpoint="other"), protocol.BAD_TOKEN),
        (_req(offset=91, length=10), protocol.OUT_OF_RANGE),
        (_req(offset=2**62, length=10), protocol.OUT_OF_RANGE),
        (_req(buffer=1, length=1), protocol.OUT_OF_RANGE),
        (_req(buffer=3), protocol.OUT_OF_RANGE),
        (_req(length=protocol.MAX_READ_BYTES + 1), protocol.BAD_REQUEST),
    ],
)
def test_check_read(req, code):
    if code is None:
        protocol.check_read(req, EXPORTS)
    else:
        with pytest.raises(ReadRefused) as e:
            protocol.check_read(req, EXPORTS)
        assert e.value.code == code


# -- the tcp transport ------------------------------------------------------------------------------
@pytest.fixture
def served():
    bufs = [host_memory.create_anonymous(n) for n in (1 << 20, 4096)]
    for i, b in enumerate(bufs):
        b.tensor.copy_(
            torch.randint(
                0, 256, (b.nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)
            )
        )
    server = TcpServer("127.0.0.1", rank=3)
    record = server.export("c", TOKEN, bufs)
    yield server, record, bufs
    server.close()


def _read(record, ranges, **kw):
    reader = TcpReader(record, owner=kw.pop("owner", "owner rank 3"), checkpoint=kw.pop("checkpoint", "c"),
                       timeout_s=kw.pop("timeout_s", 10), **kw)  # fmt: skip
    try:
        reader.read(ranges)
    finally:
        reader.close()


def test_reads_exact_bytes_chunked_and_pipelined(served):
    server, record, bufs = served
    dst = bytearray(700_000 + 100)
    view = memoryview(dst)
    ranges = [ReadRange(0, 12345, 700_000, view[:700_000]), ReadRange(1, 96, 100, view[700_000:])]
    _read(record, ranges, chunk_bytes=65536, window=3)
    assert bytes(dst[:700_000]) == bytes(bufs[0].tensor[12345 : 12345 + 700_000].numpy())
    assert bytes(dst[700_000:]) == bytes(bufs[1].tensor[96:196].numpy())
    assert server.served_bytes == 700_100


def test_strided_reads_are_packed_by_the_owner_and_placed_by_the_reader(served):
    """A column shard: 300 runs of 100 bytes, 1000 apart, in chunks of whole runs; the gaps
    of the destination stay untouched; a request past the buffer is refused."""
    server, record, bufs = served
    dst = bytearray(b"\xee" * (299 * 1000 + 100))
    view = memoryview(dst)
    _read(record, [ReadRange(0, 5000, 100, view, count=300, stride=1000)], chunk_bytes=4096)
    src = bytes(bufs[0].tensor.numpy())
    for i in range(300):
        assert dst[i * 1000 : i * 1000 + 100] == src[5000 + i * 1000 : 5100 + i * 1000]
        assert dst[i * 1000 + 100 : (i + 1) * 1000] == b"\xee" * 900 or i == 299
    assert server.served_bytes == 300 * 100
    with pytest.raises(ReadRefused, match="outside buffer 1") as e:
        _read(record, [ReadRange(1, 0, 100, memoryview(bytearray(4000 + 100)), 2, 4000)])
    assert e.value.code == protocol.OUT_OF_RANGE
    with pytest.raises(ReadRefused, match="runs of 100 bytes, 50 apart"):
        _read(record, [ReadRange(0, 0, 100, memoryview(bytearray(150)), 2, 50)])


def test_bad_token_refused_and_logged(served, caplog):
    server, record, _ = served
    caplog.set_level(logging.WARNING, logger="ckpt_engine.p2p.tcp")
    dst = memoryview(bytearray(16))
    with pytest.raises(ReadRefused, match=r"owner rank 3 at tcp://127\.0\.0\.1") as e:
        _read({**record, "token": "b" * 32}, [ReadRange(0, 0, 16, dst)])
    assert e.value.code == protocol.BAD_TOKEN
    assert server.refused == 1 and server.served_bytes == 0
    assert "refused a read from 127.0.0.1" in caplog.text


def test_refusals_are_logged_at_most_once_per_interval(served, caplog):
    server, record, _ = served
    caplog.set_level(logging.WARNING, logger="ckpt_engine.p2p.tcp")
    dst = memoryview(bytearray(16))
    for _ in range(20):
        with pytest.raises(ReadRefused):
            _read({**record, "token": "b" * 32}, [ReadRange(0, 0, 16, dst)])
    assert server.refused == 20
    warnings = [r for r in caplog.records if "refused a read" in r.getMessage()]
    assert len(warnings) == 1  # the next one, REFUSAL_LOG_INTERVAL_S later, counts the rest


def test_rate_limited_warning_reports_what_it_suppressed(caplog):
    from ckpt_engine.p2p.tcp import RateLimitedWarning

    caplog.set_level(logging.WARNING, logger="ckpt_engine.p2p.tcp")
    log = RateLimitedWarning(interval_s=3600)
    assert log.warn("refused %s", "a") and not log.warn("refused %s", "b")
    log._next = 0.0  # the interval has passed
    assert log.warn("refused %s", "c")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a",
        "refused c (and 1 more since the last warning)",
    ]


def test_a_reply_frame_over_a_chunk_drops_the_owner():
    """The reader caps inbound frames: an owner that sends more than a chunk is cut off (its
    frame is never buffered whole), and the read fails naming it."""
    ctx = zmq.Context()
    owner = ctx.socket(zmq.ROUTER)
    owner.linger = 0
    port = owner.bind_to_random_port("tcp://127.0.0.1")

    def answer_with_too_much():
        ident, header = owner.recv_multipart()
        req = protocol.decode(header)
        head = protocol.encode(protocol.DataReply(id=req.id, length=req.length))
        owner.send_multipart([ident, head, b"x" * (4 << 20)])

    thread = threading.Thread(target=answer_with_too_much, daemon=True)
    thread.start()
    record = {"address": f"tcp://127.0.0.1:{port}", "token": TOKEN}
    try:
        with pytest.raises(TransferError, match=r"owner x at .*disconnected"):
            _read(record, [ReadRange(0, 0, 16, memoryview(bytearray(16)))],
                  chunk_bytes=65536, owner="owner x")  # fmt: skip
    finally:
        thread.join(10)
        owner.close()
        ctx.term()


def test_out_of_range_refused(served):
    server, record, _ = served
    dst = memoryview(bytearray(16))
    with pytest.raises(ReadRefused, match="outside buffer 1") as e:
        _read(record, [ReadRange(1, 4090, 16, dst)])
    assert e.value.code == protocol.OUT_OF_RANGE
    assert server.served_bytes == 0


def test_withdrawn_checkpoint_is_not_served(served):
    server, record, _ = served
    server.withdraw("c")
    with pytest.raises(ReadRefused, match="not served"):
        _read(record, [ReadRange(0, 0, 16, memoryview(bytearray(16)))])


def test_garbage_from_a_peer_does_not_stop_the_server(served):
    _, record, bufs = served
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(record["address"])
        sock.send_multipart([b"x", b"y"])  # wrong frame count: dropped
        sock.send(b"not json")
        assert sock.poll(5000)
        reply = protocol.decode(sock.recv())
        assert isinstance(reply, protocol.ErrorReply) and reply.code == protocol.BAD_REQUEST
        sock.close()
    finally:
        ctx.term()
    dst = bytearray(8)
    _read(record, [ReadRange(0, 0, 8, memoryview(dst))])
    assert bytes(dst) == bytes(bufs[0].tensor[:8].numpy())


def test_silent_owner_times_out_naming_it():
    with socket.socket() as listener:  # accepts TCP, never answers zmq
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        record = {"address": f"tcp://127.0.0.1:{port}", "token": TOKEN}
        with pytest.raises(TransferError, match=f"owner rank 3 at tcp://127.0.0.1:{port}") as e:
            _read(record, [ReadRange(0, 0, 8, memoryview(bytearray(8)))], timeout_s=0.5)
    assert e.value.timed_out


def test_owner_closing_mid_read_fails_fast():
    """A server whose thread is stopped (as when its process dies) while a reader waits."""
    buf = host_memory.create_anonymous(64 << 20)
    server = TcpServer("127.0.0.1", rank=1)
    record = server.export("c", TOKEN, [buf])
    stopper = threading.Timer(0.05, server.close)
    stopper.start()
    dst = bytearray(64 << 20)
    try:
        with pytest.raises(TransferError, match="owner rank 3"):
            for _ in range(200):
                _read(record, [ReadRange(0, 0, 64 << 20, memoryview(dst))], timeout_s=5)
    finally:
        stopper.join()
        server.close()


# -- choice and the owner service --------------------------------------------------------------------
def test_transport_choice():
    assert transport.available()["tcp"] is None
    assert [t.name for t in transport.candidates("auto", ["tcp"], owner="o")] == ["tcp"]
    with pytest.raises(ValueError, match="supported: auto, mooncake, tcp"):
        transport.candidates("carrier-pigeon", ["tcp"], owner="o")
    with pytest.raises(TransferError, match=r"available here: .*tcp"):
        transport.candidates("auto", ["rdma-only"], owner="owner rank 0")
    # Mooncake (tests/ckpt_engine/test_p2p_mooncake.py) is never auto's choice without consent
    assert "mooncake" not in [t.name for t in transport.to_serve("auto")]


def test_owner_service_publish_withdraw():
    buf = host_memory.create_anonymous(1024)
    buf.tensor.fill_(7)
    service = OwnerService(host="127.0.0.1", rank=0, choice="tcp")
    try:
        record = service.publish("c", [buf])
        assert service.publish("c", [buf]) == record and set(record) == {"tcp"}
        assert len(record["tcp"]["token"]) == 32
        other = service.publish("d", [buf])
        assert other["tcp"]["token"] != record["tcp"]["token"]
        reader = open_reader(
            record, choice="auto", owner="owner rank 0", checkpoint="c", timeout_s=5
        )
        dst = bytearray(1024)
        reader.read([ReadRange(0, 0, 1024, memoryview(dst))])
        reader.close()
        assert set(dst) == {7}
        service.withdraw("c")
        reader = open_reader(
            record, choice="tcp", owner="owner rank 0", checkpoint="c", timeout_s=5
        )
        with pytest.raises(ReadRefused):
            reader.read([ReadRange(0, 0, 8, memoryview(bytearray(8)))])
        reader.close()
    finally:
        service.close()
    with pytest.raises(TransferError, match="publishes no P2P endpoint"):
        open_reader(None, choice="auto", owner="owner rank 0", checkpoint="c", timeout_s=1)


def test_local_address():
    assert local_address("127.0.0.1") == "127.0.0.1"
    assert local_address("localhost") == "127.0.0.1"
