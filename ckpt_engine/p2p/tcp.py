"""The portable P2P transport: byte ranges of registered host memory over ZMQ/TCP.

Owner: one ROUTER socket per parameter-server rank, bound to ``tcp://<host>:<OS port>``,
served by a daemon thread until ``close``. Each request (protocol.ReadRequest) is checked
(``protocol.check_read``: the checkpoint's token, bounds inside one registered buffer); the
reply's data frame is a memoryview of the host buffer sent with ``copy=False``, so the bytes go
from the (pinned) buffer to the kernel without a copy in between. Refusals are logged with the
peer's address (at most one warning per ``REFUSAL_LOG_INTERVAL_S``, with the count of refusals
since the last one: a peer cannot flood the log) and answered with an ErrorReply. Inbound frames are capped (MAXMSGSIZE), so an
unauthenticated peer cannot make the owner buffer much.

Reader: one DEALER socket per owner, its inbound frames capped at one chunk (an owner cannot make
it buffer more); a read is split into chunks with a window of requests in flight; each reply lands with ``recv_into`` straight in the destination. Every wait has a
deadline (no progress for ``timeout_s`` fails); the socket monitor notices an owner whose
connection drops (a dead process) at once. Errors name the owner (rank and address).

The token travels in clear text and the data unencrypted: use it on a trusted network.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from ckpt_engine.errors import ProtocolError, ReadRefused, TransferError
from ckpt_engine.host_memory import HostBuffer
from ckpt_engine.p2p import protocol
from ckpt_engine.p2p.transport import OwnerServer, Reader, ReadRange, Transport

logger = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
WINDOW = 8  # chunks in flight per reader
_POLL_MS = 100
REFUSAL_LOG_INTERVAL_S = 10.0


class RateLimitedWarning:
    """A warning logged at most once per ``interval_s``; the ones in between are counted and the
    count is reported with the next one that is logged."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._next = 0.0
        self._suppressed = 0

    def warn(self, msg: str, *args: object) -> bool:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return False
        if self._suppressed:
            msg += " (and %d more since the last warning)"
            args = (*args, self._suppressed)
        logger.warning(msg, *args)
        self._next, self._suppressed = now + self.interval_s, 0
        return True


def _tcp_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class TcpServer(OwnerServer):
    name = "tcp"

    def __init__(self, host: str, rank: int) -> None:
        self.rank = rank
        self._lock = threading.Lock()
        self._exports: dict[str, tuple[protocol.Export, list[memoryview]]] = {}
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self.address = ""
        self.served_bytes = 0
        self.refused = 0
        self._refusal_log = RateLimitedWarning()
        self._thread = threading.Thread(
            target=self._run, args=(host,), name=f"ckpt-engine-p2p-tcp-r{rank}", daemon=True
        )
        self._thread.start()
        self._bound.wait()
        if self._error is not None:
            raise TransferError(f"rank {rank}: cannot serve P2P on {host}: {self._error}")
        logger.info("rank %d: serving P2P reads on %s", rank, self.address)

    def export(self, checkpoint: str, token: str, buffers: Sequence[HostBuffer]) -> dict[str, Any]:
        views = [b.memoryview() if b.nbytes else memoryview(b"") for b in buffers]
        export = protocol.Export(token, tuple(b.nbytes for b in buffers))
        with self._lock:
            self._exports[checkpoint] = (export, views)
        return {"address": self.address, "token": token}

    def withdraw(self, checkpoint: str) -> None:
        with self._lock:
            self._exports.pop(checkpoint, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        with self._lock:
            self._exports.clear()

    # -- the serving thread ----------------------------------------------------------------------
    def _run(self, host: str) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        try:
            sock.linger = 0
            sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_HEADER_BYTES)
            sock.setsockopt(zmq.SNDHWM, 0)  # replies reference host memory; readers bound them
            sock.setsockopt(zmq.RCVHWM, 1000)
            try:
                port = sock.bind_to_random_port(_tcp_address(host, 0).rsplit(":", 1)[0])
            except zmq.ZMQError as e:
                self._error = e
                return
            self.address = _tcp_address(host, port)
            self._bound.set()
            while not self._stop.is_set():
                if sock.poll(_POLL_MS, zmq.POLLIN):
                    self._handle(sock)
        finally:
            self._bound.set()
            sock.close(linger=0)
            ctx.term()

    def _handle(self, sock: zmq.Socket) -> None:
        frames = sock.recv_multipart(copy=False)
        if len(frames) != 2:
            self.refused += 1
            self._refusal_log.warn(
                "rank %d: P2P: dropped a message of %d frames", self.rank, len(frames)
            )
            return
        ident, header = frames
        req_id = 0
        try:
            req = protocol.decode(header.bytes)
            if not isinstance(req, protocol.ReadRequest):
                raise ProtocolError(f"expected a read request, got {req.TYPE}")
            req_id = req.id
            with self._lock:
                entry = self._exports.get(req.checkpoint)
                exports = {req.checkpoint: entry[0]} if entry is not None else {}
            protocol.check_read(req, exports)
        except (ProtocolError, ReadRefused) as e:
            self.refused += 1
            code = getattr(e, "code", "") or protocol.BAD_REQUEST
            peer = _peer(header)
            self._refusal_log.warn("rank %d: P2P: refused a read from %s: %s", self.rank, peer, e)
            reply = protocol.ErrorReply(id=req_id, code=code, message=f"rank {self.rank}: {e}")
            sock.send_multipart([ident, protocol.encode(reply)])
            return
        view = entry[1][req.buffer]
        if req.count == 1:
            data = view[req.offset : req.offset + req.length]
        else:  # a column shard: its runs packed by one copy
            data = _strided(view, req.offset, req.count, req.length, req.stride).copy().data
        head = protocol.encode(protocol.DataReply(id=req.id, length=req.total))
        # Counted before the send: a reader that has its bytes always sees them counted.
        self.served_bytes += req.total
        sock.send_multipart([ident, head, data], copy=False)


def _strided(view: memoryview, offset: int, count: int, run: int, stride: int) -> np.ndarray:
    """``count`` runs of ``run`` bytes of ``view``, each ``stride`` after the previous, as a
    (count, run) array over ``view`` (no copy; bounds checked by the caller)."""
    flat = np.frombuffer(view, dtype=np.uint8)[offset:]
    return np.lib.stride_tricks.as_strided(flat, shape=(count, run), strides=(stride, 1))


def _peer(frame: zmq.Frame) -> str:
    with contextlib.suppress(Exception):
        return frame.get("Peer-Address")
    return "an unknown peer"


class TcpReader(Reader):
    def __init__(
        self,
        record: dict[str, Any],
        *,
        owner: str,
        checkpoint: str,
        timeout_s: float,
        chunk_bytes: int = CHUNK_BYTES,
        window: int = WINDOW,
    ) -> None:
        address, token = record.get("address"), record.get("token")
        if not isinstance(address, str) or not address.startswith("tcp://"):
            raise TransferError(f"{owner}: bad tcp endpoint address {address!r}", owner=owner)
        if not isinstance(token, str) or not token:
            raise TransferError(f"{owner}: tcp endpoint has no token", owner=owner)
        self.owner = f"{owner} at {address}"
        self.checkpoint, self.token = checkpoint, token
        self.timeout_s, self.chunk_bytes, self.window = timeout_s, chunk_bytes, window
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.RCVHWM, 0)
        # Replies are bounded too: a data frame is at most one chunk, a header far less.
        self.sock.setsockopt(zmq.MAXMSGSIZE, max(chunk_bytes, protocol.MAX_HEADER_BYTES))
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(address)
        self.connected = False
        self.lost = False
        self._next_id = 0

    def _fail(self, message: str, *, timed_out: bool = False) -> TransferError:
        return TransferError(
            f"P2P read of {self.checkpoint!r} from {self.owner}: {message}",
            owner=self.owner,
            timed_out=timed_out,
        )

    def _refresh(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.lost = True

    def _wait_reply(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            self._refresh()
            if self.sock.poll(0):
                return
            if self.lost:
                raise self._fail("the owner disconnected (died?) during the transfer")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = "no reply" if self.connected else "could not connect"
                raise self._fail(f"{what} within {self.timeout_s} s", timed_out=True)
            poller.poll(max(1, int(remaining * 1000)))

    def read(self, ranges: Sequence[ReadRange]) -> int:
        # (buffer, offset, run bytes, runs, stride, dst): at most one chunk of bytes each
        chunks: deque[tuple[int, int, int, int, int, memoryview]] = deque()
        for r in ranges:
            if len(r.dst) != r.span:
                raise ValueError(f"destination of {len(r.dst)} bytes for a {r.span}-byte range")
            if r.count > 1 and r.nbytes < self.chunk_bytes:  # strided: whole runs per chunk
                rows = self.chunk_bytes // r.nbytes
                for i in range(0, r.count, rows):
                    k = min(rows, r.count - i)
                    a = i * r.stride
                    dst = r.dst[a : a + (k - 1) * r.stride + r.nbytes]
                    chunks.append((r.buffer, r.offset + a, r.nbytes, k, r.stride, dst))
                continue
            for offset, at in r.runs():
                for start in range(0, r.nbytes, self.chunk_bytes):
                    n = min(self.chunk_bytes, r.nbytes - start)
                    dst = r.dst[at + start : at + start + n]
                    chunks.append((r.buffer, offset + start, n, 1, 0, dst))
        in_flight: deque[tuple[int, memoryview, int, int, int]] = deque()
        while chunks or in_flight:
            while chunks and len(in_flight) < self.window:
                buffer, offset, run, count, stride, dst = chunks.popleft()
                req = protocol.ReadRequest(
                    id=self._next_id,
                    token=self.token,
                    checkpoint=self.checkpoint,
                    buffer=buffer,
                    offset=offset,
                    length=run,
                    count=count,
                    stride=stride,
                )
                self._next_id += 1
                self.sock.send(protocol.encode(req))
                in_flight.append((req.id, dst, run, count, stride))
            self._receive(*in_flight.popleft())
        return sum(r.total for r in ranges)  # the owner packs a column shard's runs

    def _receive(
        self, req_id: int, dst: memoryview, run: int = 0, count: int = 1, stride: int = 0
    ) -> None:
        if count > 1:  # packed runs: received whole, then put in their places
            packed = bytearray(run * count)
            self._receive(req_id, memoryview(packed))
            _strided(dst, 0, count, run, stride)[:] = np.frombuffer(packed, np.uint8).reshape(
                count, run
            )
            return
        self._wait_reply()
        try:
            reply = protocol.decode(self.sock.recv())
        except ProtocolError as e:
            raise self._fail(f"bad reply: {e}") from e
        if reply.id != req_id:
            raise self._fail(f"reply to request {reply.id}, expected {req_id}")
        if isinstance(reply, protocol.ErrorReply):
            raise ReadRefused(
                f"P2P read of {self.checkpoint!r} from {self.owner} refused: {reply.message}",
                owner=self.owner,
                code=reply.code,
            )
        if not isinstance(reply, protocol.DataReply) or reply.length != len(dst):
            raise self._fail(f"unexpected reply {reply}")
        if not self.sock.getsockopt(zmq.RCVMORE):
            raise self._fail("data reply without its data frame")
        got = self.sock.recv_into(dst)
        if got != len(dst) or self.sock.getsockopt(zmq.RCVMORE):
            raise self._fail(f"data frame of {got} bytes, expected {len(dst)}")

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self._ctx.term()


class TcpTransport(Transport):
    name = "tcp"

    def unavailable(self) -> str | None:
        return None

    def serve(self, host: str, rank: int) -> TcpServer:
        return TcpServer(host, rank)

    def reader(
        self, record: dict[str, Any], *, owner: str, checkpoint: str, timeout_s: float
    ) -> TcpReader:
        return TcpReader(record, owner=owner, checkpoint=checkpoint, timeout_s=timeout_s)
