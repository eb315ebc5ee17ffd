"""Our broadcast update speaking the upstream checkpoint-engine 0.4.x wire to its workers.

Only the conversation with the worker changes; everything else is ps/broadcast.py as is: the
same plan, the same slot mover (no intermediate H2D buffer, copies and broadcast queued on a
side stream, the host waiting on an event only right before telling the worker), the same votes
and cleanup, so a failure anywhere fails every rank alike. The upstream worker only ever sees
absolute offsets into the buffer, so our slot layout fits its wire.

Message for message (compat/upstream_wire.py):
    Plan   -> the pickled IPC handle (``reduce_tensor`` of the buffer; our shm stand-in on CPU)
    Bucket -> the pickled name/dtype/shape/offset list, offsets from the start of the buffer
    Done   -> None (the worker releases the buffer)   Commit -> None (the worker runs post_hook)
    Abort  -> pickled RuntimeError("Some workers failed to update weights: <reason>"); no reply
and every reply ``b""`` is an Ack, anything else the worker's traceback (WorkerError).

Stricter than upstream where the wire allows: the reply to the last bucket and to both ``None``
messages is checked (upstream ignores them, so a ``run`` failing on the last bucket passes
there), every wait has a deadline, a second peer on the socket is refused, and a name already
bound (another server on this device, or a squatter) fails the update instead of racing it.
"""

from __future__ import annotations

import logging

import zmq

from ckpt_engine import wire
from ckpt_engine.compat import upstream_wire
from ckpt_engine.errors import WorkerError
from ckpt_engine.planner import BucketPlan
from ckpt_engine.ps.broadcast import BroadcastUpdate
from ckpt_engine.ps.link import WorkerLink
from ckpt_engine.ps.mover import Launched

logger = logging.getLogger(__name__)


class UpstreamLink(WorkerLink):
    """The REQ socket at upstream's address, translating our message sequence to its wire."""

    def __init__(self, ctx: zmq.Context, address: str, *, update_id: str, max_bytes: int) -> None:
        try:
            super().__init__(ctx, address, update_id=update_id, max_bytes=max_bytes)
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE:
                raise
            raise WorkerError(
                f"{address} is already bound: another parameter server on this device, or a "
                "local process holding the predictable upstream socket name"
            ) from e
        self.handle_sent = False

    def _encode(self, msg: object) -> bytes:
        if isinstance(msg, upstream_wire.Encoded):
            return msg.data
        if isinstance(msg, (wire.Done, wire.Commit)):
            return upstream_wire.encode_none()
        if isinstance(msg, wire.Abort):
            return upstream_wire.encode_abort(msg.reason)
        raise TypeError(f"the upstream wire has no message for {type(msg).__name__}")

    def send(self, msg: object, *, what: str) -> None:
        data = self._encode(msg)
        try:
            self.channel.sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            raise WorkerError(f"worker not reachable to send {what}") from None
        if isinstance(msg, upstream_wire.Encoded) and msg.kind == "handle":
            self.handle_sent = True
        self.awaiting = what

    def _recv(self) -> str | None:
        data = self.channel.sock.recv(zmq.NOBLOCK)
        self.awaiting = None
        return upstream_wire.decode_reply(data)

    def reply(self, deadline: float, *, of: str, bucket: int | None = None) -> wire.Ack | None:
        what = f"waiting for the worker's reply to {self.awaiting}"
        if not self._wait(zmq.POLLIN, deadline, what, bucket):
            return None
        failure = self._recv()
        if failure is not None:
            raise WorkerError(
                f"worker failed: {upstream_wire.summary(failure)}", bucket=bucket, traceback=failure
            )
        if of == "commit":
            self.finished = True
        return wire.Ack(update_id=self.update_id, of=of, id=bucket)

    def abort(self, reason: str, grace_s: float) -> None:
        """Send upstream's abort (a pickled RuntimeError) and wait for the worker to hang up.

        A reply still owed is taken first. A worker still waiting for the handle answers the
        exception with its traceback and waits for one more message: it gets the exception again.
        """
        deadline = self._abort_deadline(grace_s)
        if deadline is None:
            return
        try:
            if self.awaiting is not None:
                if not self._wait(zmq.POLLIN, deadline, "aborting", None):
                    return
                self._recv()
            abort = upstream_wire.encode_abort(reason)
            self.channel.sock.send(abort, zmq.NOBLOCK)
            if not self.handle_sent:
                if not self._wait(zmq.POLLIN, deadline, "aborting", None):
                    return
                self._recv()
                self.channel.sock.send(abort, zmq.NOBLOCK)
            # No reply comes: the worker raises and closes its socket. Wait for that, so the
            # message is delivered before our socket (linger 0) goes.
            self.finished = self.channel.wait(zmq.POLLIN, deadline) == self.channel.LOST
        except (WorkerError, zmq.ZMQError) as e:
            logger.info("worker gone while aborting: %s", e)


class UpstreamBroadcastUpdate(BroadcastUpdate):
    """BroadcastUpdate with the upstream wire to the worker (see the module docstring)."""

    def _make_link(self) -> UpstreamLink:
        ctx = self.ctx
        return UpstreamLink(
            self.zmq_ctx,
            # upstream counts binds from 0; update_no is the same on every rank
            upstream_wire.address(ctx.device_key, ctx.update_no - 1),
            update_id=self.update_id,
            max_bytes=ctx.config.max_message_bytes,
        )

    def _plan_message(self, plan: BucketPlan) -> upstream_wire.Encoded:
        ipc = self.ipc
        if ipc.device_type == "cuda":
            data = upstream_wire.encode_cuda_handle(ipc.tensor)
        else:
            data = upstream_wire.encode_shm_handle(ipc.handle.path, ipc.nbytes, ipc.device_index)
        return upstream_wire.Encoded("handle", data)

    def _bucket_message(self, launched: Launched) -> upstream_wire.Encoded:
        base = launched.slot * self.mover.slot_bytes
        items = ((i.name, i.dtype, i.shape, base + i.offset) for i in launched.bucket.items)
        return upstream_wire.Encoded("bucket", upstream_wire.encode_bucket(items))
