"""The PS side of one update's conversation with its colocated worker.

WorkerLink: a REQ socket bound at an unguessable address, strict request/reply (REQ_RELAXED
would drop the connection to send out of turn), waits with deadlines, and fails fast when the
worker disconnects or a second peer shows up.
ReqFuncThread: runs the caller's ``req_func(socket_paths)`` and wakes the link's waits when it
finishes, so a req_func that raises before its worker connects ends the wait at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
import traceback
from collections.abc import Callable

import zmq

from ckpt_engine import wire
from ckpt_engine.channel import Channel, ipc_path
from ckpt_engine.errors import ProtocolError, WorkerError

logger = logging.getLogger(__name__)

SocketPaths = list[tuple[str, str]]


class ReqFuncThread:
    """``req_func(socket_paths)`` on a daemon thread; ``notify`` becomes readable when it ends."""

    def __init__(
        self, ctx: zmq.Context, req_func: Callable[[SocketPaths], object], socket_paths: SocketPaths
    ) -> None:
        self._ctx = ctx
        self._addr = f"inproc://ckpt-engine-req-{secrets.token_hex(8)}"
        self.notify = ctx.socket(zmq.PAIR)
        self.notify.linger = 0
        self.notify.bind(self._addr)
        self.error: BaseException | None = None
        self.traceback = ""
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(req_func, socket_paths),
            name="ckpt-engine-req-func",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def _run(self, req_func: Callable[[SocketPaths], object], socket_paths: SocketPaths) -> None:
        try:
            req_func(socket_paths)
        except BaseException as e:  # reported to the update, which fails on every rank
            self.error = e
            self.traceback = traceback.format_exc()
            logger.warning("req_func raised: %r", e)
        finally:
            self._done.set()
            self._wake()

    def _wake(self) -> None:
        """Wake the update's waits; a socket only now, so a stuck req_func holds none."""
        try:
            sock = self._ctx.socket(zmq.PAIR)
        except zmq.ZMQError:  # the update is over and its context terminated
            return
        try:
            sock.linger = 0
            sock.connect(self._addr)
            sock.send(b"done", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        finally:
            sock.close()

    def consume(self) -> None:
        """Called when ``notify`` is readable: take the wake-up; raise if req_func failed."""
        while self.notify.poll(0):
            self.notify.recv()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise WorkerError(
                f"req_func raised {type(self.error).__name__}: {self.error}",
                traceback=self.traceback,
            )

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def join(self, deadline: float) -> bool:
        """Wait for req_func to return (until ``deadline``); True if it did."""
        return self._done.wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.notify.close()


class WorkerLink:
    """REQ socket to one worker; every wait has a deadline (time.monotonic)."""

    def __init__(
        self,
        ctx: zmq.Context,
        address: str,
        *,
        update_id: str,
        max_bytes: int,
        single_peer: bool = True,
    ) -> None:
        self.address = address
        self.update_id = update_id
        sock = ctx.socket(zmq.REQ)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        try:
            sock.bind(address)
        except zmq.ZMQError:
            sock.close()  # an open socket would block the context's term()
            raise
        self.channel = Channel(sock, max_bytes=max_bytes)
        self.single_peer = single_peer
        self.awaiting: str | None = None  # what the worker owes us a reply for
        self.finished = False  # the worker acknowledged Commit or Abort and has returned
        self.req: ReqFuncThread | None = None

    def _wait(self, flag: int, deadline: float, what: str, bucket: int | None) -> bool:
        """Wait for ``flag``; False on deadline; raise if the worker is gone or req_func failed."""
        while True:
            extra = self.req.notify if self.req is not None and not self.req.finished else None
            state = self.channel.wait(flag, deadline, extra)
            if self.single_peer and self.channel.ever_connected > 1:
                raise ProtocolError(f"a second process connected to {self.address} while {what}")
            if state == Channel.READY:
                return True
            if state == Channel.TIMEOUT:
                if self.req is not None:
                    self.req.check()
                return False
            if state == Channel.LOST:
                raise WorkerError(f"worker disconnected (died?) while {what}", bucket=bucket)
            self.req.consume()  # EXTRA: req_func ended; raises if it failed

    def wait_connected(self, deadline: float) -> bool:
        return self._wait(zmq.POLLOUT, deadline, "waiting for the worker to connect", None)

    def send(self, msg: wire.Message, *, what: str) -> None:
        try:
            self.channel.send(msg)
        except zmq.Again:
            raise WorkerError(f"worker not reachable to send {what}") from None
        self.awaiting = what

    def reply(self, deadline: float, *, of: str, bucket: int | None = None) -> wire.Ack | None:
        """The worker's Ack for the last request, or None at the deadline.

        Raises WorkerError if the worker answered Error, disconnected, or req_func failed.
        """
        what = f"waiting for the worker's reply to {self.awaiting}"
        if not self._wait(zmq.POLLIN, deadline, what, bucket):
            return None
        msg = self.channel.recv()
        self.awaiting = None
        if isinstance(msg, wire.Error):
            raise WorkerError(msg.message, bucket=msg.bucket, traceback=msg.traceback)
        if not isinstance(msg, wire.Ack) or msg.update_id != self.update_id:
            raise ProtocolError(f"expected an ack of {of} for update {self.update_id}, got {msg}")
        if msg.of != of or (bucket is not None and msg.id != bucket):
            raise ProtocolError(f"expected an ack of {of} {bucket}, got ack of {msg.of} {msg.id}")
        if of in ("commit", "abort"):
            self.finished = True
        return msg

    def request(
        self, msg: wire.Message, deadline: float, *, of: str, bucket: int | None = None
    ) -> wire.Ack:
        """Send and wait for the Ack; WorkerError(timed_out=True) at the deadline."""
        self.send(msg, what=f"{of}" if bucket is None else f"bucket {bucket}")
        ack = self.reply(deadline, of=of, bucket=bucket)
        if ack is None:
            raise WorkerError(
                f"no reply from the worker to {self.awaiting} in time",
                bucket=bucket,
                timed_out=True,
            )
        return ack

    def _abort_deadline(self, grace_s: float) -> float | None:
        """Where an abort may still reach a worker: its grace deadline; None if none listens."""
        self.channel.refresh()
        if self.finished or self.channel.ever_connected == 0 or self.channel.peer_lost:
            return None
        self.req = None  # a req_func failure must not cut the grace period short
        return time.monotonic() + grace_s

    def abort(self, reason: str, grace_s: float) -> None:
        """Tell a still-listening worker to give up, and wait briefly for its Ack.

        A reply still owed for an earlier request is taken (and dropped) first; a worker that
        does not answer within ``grace_s`` is left to notice the closed socket instead.
        """
        deadline = self._abort_deadline(grace_s)
        if deadline is None:
            return
        try:
            if self.awaiting is not None:
                if not self._wait(zmq.POLLIN, deadline, "aborting", None):
                    return
                self.channel.recv()
                self.awaiting = None
            self.channel.send(wire.Abort(update_id=self.update_id, reason=reason))
            self.awaiting = "abort"
            if self._wait(zmq.POLLIN, deadline, "aborting", None):
                msg = self.channel.recv()
                self.awaiting = None
                self.finished = isinstance(msg, wire.Ack) and msg.of == "abort"
        except (WorkerError, ProtocolError, zmq.ZMQError) as e:
            logger.info("worker gone while aborting: %s", e)

    def close(self) -> None:
        self.channel.close()
        path = ipc_path(self.address)  # zmq removes it asynchronously, if at all
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
