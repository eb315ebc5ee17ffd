"""Worker side of the upstream checkpoint-engine 0.4.x wire: receive from an upstream (or our
``wire="upstream"``) ParameterServer. Reached through
``ckpt_engine.update_weights_from_ipc(..., wire="upstream")``; see compat/upstream_wire.py for
the message sequence.

Where it differs from upstream's worker, it is on the safe side of the same wire: messages are
unpickled through an allowlist (the handle's rebuild function, torch dtypes, ``torch.Size``,
builtin exceptions), bucket entries are bounds-checked, every wait has a deadline, and a
parameter server that disappears ends the update at once. After a failure of ``run`` it keeps
answering with the traceback until the parameter server aborts; an upstream parameter server
does not read the reply to the last bucket nor to the ``None`` messages and carries on, so then
the worker skips ``post_hook`` and raises UpdateAborted at the end instead of returning.

The upstream wire announces no manifest: ``validate``, if given, runs once with every tensor
received, when the parameter server releases the buffer (after the last bucket, before
``post_hook``): it can still refuse an incomplete update, but only after the data was written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import zmq

from ckpt_engine import env, wire
from ckpt_engine.bulk import paused_gc
from ckpt_engine.channel import Channel
from ckpt_engine.compat import upstream_wire, warn_upstream
from ckpt_engine.errors import ProtocolError, UpdateAborted
from ckpt_engine.ipc import release_ipc_buffer
from ckpt_engine.wire import TensorSpec

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0  # upstream's own request timeout; upstream's worker waits forever


class _Conversation:
    """The REP socket: raw frames, waits with a deadline, peer loss seen at once."""

    def __init__(self, ctx: zmq.Context, address: str, timeout_s: float) -> None:
        if not address.startswith("ipc://"):  # upstream binds ipc://@checkpoint-engine-...
            raise UpdateAborted(
                f"refusing to connect to {address!r}: a worker connects only to a local ipc:// "
                "socket of its parameter server"
            )
        max_bytes = env.max_message_bytes()
        max_bytes = max_bytes if max_bytes is not None else wire.DEFAULT_MAX_MESSAGE_BYTES
        sock = ctx.socket(zmq.REP)
        sock.linger = 1000  # let the last reply leave before the socket closes
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        self.channel = Channel(sock, max_bytes=max_bytes)
        sock.connect(address)
        self.address = address
        self.timeout_s = timeout_s

    def recv(self) -> bytes:
        state = self.channel.wait(zmq.POLLIN, time.monotonic() + self.timeout_s)
        if state == Channel.LOST:
            raise UpdateAborted(f"parameter server at {self.address} disconnected")
        if state != Channel.READY:
            raise UpdateAborted(f"no message from the parameter server within {self.timeout_s} s")
        return self.channel.sock.recv(zmq.NOBLOCK)

    def reply(self, data: bytes) -> None:
        self.channel.sock.send(data)

    def close(self) -> None:
        self.channel.close()


def _aborted(payload: BaseException, failure: BaseException | None) -> UpdateAborted:
    reason = f"parameter server aborted the update: {type(payload).__name__}: {payload}"
    if failure is not None:
        reason += f" (failed here first: {type(failure).__name__}: {failure})"
    return UpdateAborted(reason)


def _finish(conv: _Conversation, post_hook: Callable[[], None] | None, cuda: int | None) -> None:
    """Run post_hook and answer the second None; a failure is answered, then raised at once."""
    try:
        if post_hook is not None:
            post_hook()
        if cuda is not None:
            torch.cuda.synchronize(cuda)
    except Exception as e:
        conv.reply(upstream_wire.encode_failure(e))
        raise UpdateAborted(f"post_hook failed: {type(e).__name__}: {e}") from e
    conv.reply(upstream_wire.OK)


def update_weights_from_upstream_ipc(
    zmq_ctx: zmq.Context,
    zmq_handle: str,
    device_id: int,
    *,
    run: Callable[[list[tuple[str, torch.Tensor]]], None],
    post_hook: Callable[[], None] | None = None,
    validate: Callable[[list[TensorSpec]], None] | None = None,
    timeout_s: float | None = None,
) -> None:
    """One update over the upstream wire; raises UpdateAborted on any failure, never hangs.

    ``timeout_s`` bounds every wait for the parameter server (default CKPT_ENGINE_WORKER_TIMEOUT_S,
    else 300 s).
    """
    warn_upstream("worker")
    timeout = env.resolve_worker_timeout_s(timeout_s, DEFAULT_TIMEOUT_S)
    conv = _Conversation(zmq_ctx, zmq_handle, timeout)
    buffer: torch.Tensor | None = None
    is_cuda = False
    released = False
    try:
        data = conv.recv()
        try:
            buffer, is_cuda = upstream_wire.rebuild_handle(upstream_wire.decode(data), device_id)
        except Exception as e:  # upstream: reply the traceback, take one more message, raise
            conv.reply(upstream_wire.encode_failure(e))
            conv.recv()
            raise UpdateAborted(f"cannot map the IPC buffer: {type(e).__name__}: {e}") from e
        conv.reply(upstream_wire.OK)
        failure: BaseException | None = None
        received: list[TensorSpec] = []
        while True:
            try:
                payload = upstream_wire.decode(conv.recv())
            except ProtocolError as e:
                failure = failure or e
                conv.reply(upstream_wire.encode_failure(e))
                continue
            if isinstance(payload, BaseException):
                raise _aborted(payload, failure) from failure
            if failure is not None:  # keep in step until the PS aborts (or ignores us)
                if payload is None and released:
                    conv.reply(upstream_wire.encode_failure(failure))
                    raise UpdateAborted(
                        f"update failed here ({type(failure).__name__}: {failure}); the "
                        "parameter server went on, post_hook skipped"
                    ) from failure
                if payload is None:
                    buffer = None
                    release_ipc_buffer("cuda" if is_cuda else "cpu", device_id)
                    released = True
                conv.reply(upstream_wire.encode_failure(failure))
                continue
            try:
                if isinstance(payload, list) and not released:
                    with paused_gc():  # as our own wire's worker (ckpt_engine.worker)
                        weights, specs = upstream_wire.bucket_views(payload, buffer)
                        run(weights)
                        del weights
                    if is_cuda:
                        torch.cuda.synchronize(device_id)
                    received.extend(specs)
                elif payload is None and not released:
                    if is_cuda:
                        torch.cuda.synchronize(device_id)
                    buffer = None
                    release_ipc_buffer("cuda" if is_cuda else "cpu", device_id)
                    released = True
                    if validate is not None:
                        validate(received)
                elif payload is None:  # the last message of the wire: nothing follows it
                    _finish(conv, post_hook, device_id if is_cuda else None)
                    return
                else:
                    state = "after the release" if released else "during the update"
                    raise ProtocolError(f"unexpected {type(payload).__name__} message {state}")
            except Exception as e:
                failure = e
                logger.warning("upstream-wire update failed: %s: %s", type(e).__name__, e)
                conv.reply(upstream_wire.encode_failure(e))
                continue
            conv.reply(upstream_wire.OK)
    finally:
        buffer = None
        if not released:
            release_ipc_buffer("cuda" if is_cuda else "cpu", device_id)
        conv.close()
