"""The worker-side primitive any inference engine calls: ``update_weights_from_ipc``.

Same signature as the upstream checkpoint-engine function, so engines that call that one can call
ours, plus optional keywords ``validate`` and ``timeout_s``. It speaks our wire protocol
(ckpt_engine.wire: typed JSON, no pickle) over a REP socket connected to the parameter server's
address, which must be a local socket of a parameter server (``channel.check_local_address``:
an ``ipc://`` path in a private ckpt-engine socket directory, or an abstract ckpt-engine name;
anything else, ``tcp://`` included, is refused with UpdateAborted before connecting), maps the IPC buffer (CUDA IPC on this process's ``device_id``, shared memory on CPU),
and for each bucket calls ``run([(name, tensor_view), ...])``.

The views point into the shared buffer and are only valid during that ``run`` call: copy what
you keep (``model.load_weights`` does). On GPU the device is synchronized after each ``run``
before the bucket is acknowledged, since the parameter server then reuses the slot.
The cyclic garbage collector is paused while a bucket's views are made and ``run`` uses them
(``ckpt_engine.bulk``): in an engine's heap, thousands of new view objects per bucket set off
collections that walk the whole heap (a 150,000-tensor update on CPU: 0.93 s with the
collector running, 0.37 s paused); what ``run`` leaves as cyclic garbage is collected after the
bucket as usual.

After the last bucket the worker checks that every tensor of the manifest arrived exactly once,
releases the buffer, and once every rank has succeeded runs ``post_hook()`` once. If anything
fails on any rank, the parameter server sends Abort and this function raises UpdateAborted
(chained from the local exception, if the failure was here); it never hangs: every receive has
a deadline and a parameter server that disappears is noticed at once.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Mapping

import numpy as np
import torch
import zmq

from ckpt_engine import dtypes, env, leases, wire
from ckpt_engine.bulk import paused_gc, without_gc
from ckpt_engine.channel import Channel, check_local_address, ipc_path
from ckpt_engine.compat import check_wire
from ckpt_engine.errors import ProtocolError, UpdateAborted
from ckpt_engine.ipc import open_ipc_buffer, release_ipc_buffer
from ckpt_engine.wire import TensorSpec

logger = logging.getLogger(__name__)

DEFAULT_FIRST_MESSAGE_TIMEOUT_S = 60.0

Weights = list[tuple[str, torch.Tensor]]


# The last plan columns this process accepted, with what accept_plan derived from them. The wire
# hands out the same Manifest/Layout objects for a repeated plan (wire.decode_frames), so a
# repeat is recognised by identity and its column checks are skipped.
_accepted: tuple | None = None


def _remember(entry: tuple) -> None:
    global _accepted
    _accepted = entry


class _Session:
    """One update seen from the worker: socket, plan, and what has been delivered so far."""

    def __init__(self, ctx: zmq.Context, address: str, device_id: int) -> None:
        try:
            check_local_address(address)
        except ValueError as e:
            raise UpdateAborted(str(e)) from e
        path = ipc_path(address)
        if path is not None and not os.path.exists(path):
            raise UpdateAborted(f"no parameter server listening at {address}")
        max_bytes = env.max_message_bytes()
        self.max_bytes = max_bytes if max_bytes is not None else wire.DEFAULT_MAX_MESSAGE_BYTES
        sock = ctx.socket(zmq.REP)
        sock.linger = 1000  # let the last reply leave before the socket closes
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_bytes)
        self.channel = Channel(sock, max_bytes=self.max_bytes)
        sock.connect(address)
        self.address = address
        self.device_id = device_id
        self.plan: wire.Plan | None = None
        self.next_bucket = 0
        self.starts: list[int] = [0]
        self.kinds: list[str] = []  # the manifest's dtypes
        self.rows: list[tuple] = []  # per manifest tensor (see _rows)
        # per dtype of ``kinds``: (typed view of the whole buffer, its storage offset, elements
        # per slot)
        self._typed: list[tuple[torch.Tensor, int, int]] = []
        self.released = False

    def recv(self, timeout_s: float) -> wire.Message:
        state = self.channel.wait(zmq.POLLIN, time.monotonic() + timeout_s)
        if state == Channel.LOST:
            raise UpdateAborted(f"parameter server at {self.address} disconnected")
        if state != Channel.READY:
            raise UpdateAborted(f"no message from the parameter server within {timeout_s} s")
        return self.channel.recv()

    def send(self, msg: wire.Message) -> None:
        self.channel.send(msg)

    @property
    def update_id(self) -> str:
        return self.plan.update_id if self.plan is not None else ""

    def error(self, stage: str, exc: BaseException, bucket: int | None = None) -> wire.Error:
        return wire.Error(
            update_id=self.update_id,
            stage=stage,
            bucket=bucket,
            message=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        )

    @without_gc
    def accept_plan(self, plan: wire.Plan) -> None:
        """Check the plan's geometry once, with whole-column operations, so that a bucket costs
        one ``as_strided`` per tensor and no check."""
        if plan.num_slots < 1 or plan.buffer.nbytes < plan.num_slots * plan.slot_bytes:
            raise ProtocolError(
                f"buffer of {plan.buffer.nbytes} bytes cannot hold {plan.num_slots} slots "
                f"of {plan.slot_bytes}"
            )
        manifest, layout = plan.manifest, plan.layout
        last = _accepted
        if (
            last is not None
            and last[0] is manifest
            and last[1] is layout
            and last[2] == plan.slot_bytes
        ):
            self.plan, self.itemsizes, self.starts, self.rows = plan, *last[3:]
            self.kinds = list(self.itemsizes)
            return
        names = manifest.names
        if len(set(names)) != len(names):
            seen: set[str] = set()
            twice = next(n for n in names if n in seen or seen.add(n))
            raise ProtocolError(f"tensor {twice!r} appears twice in the manifest")
        self.itemsizes = {d: dtypes.itemsize(d) for d in set(manifest.dtypes)}
        size = np.fromiter(map(self.itemsizes.__getitem__, manifest.dtypes), np.int64, len(names))
        counts = list(map(math.prod, manifest.shapes))
        if max(counts, default=0) > plan.slot_bytes:  # before int64 arithmetic can overflow
            i = next(i for i, n in enumerate(counts) if n > plan.slot_bytes)
            raise ProtocolError(
                f"tensor {names[i]!r} of shape {list(manifest.shapes[i])} would overrun the "
                f"slot of {plan.slot_bytes}"
            )
        numel = np.fromiter(counts, np.int64, len(names))
        nbytes = numel * size
        offsets = np.asarray(layout.offsets, dtype=np.int64)
        bad = np.flatnonzero((offsets % size != 0) | (offsets + nbytes > plan.slot_bytes))
        if bad.size:
            i = int(bad[0])
            raise ProtocolError(
                f"tensor {names[i]!r}: offset {offsets[i]} is misaligned for {manifest.dtypes[i]} "
                f"or its {nbytes[i]} bytes overrun the slot of {plan.slot_bytes}"
            )
        misfit = [d for d, n in self.itemsizes.items() if plan.slot_bytes % n]
        if misfit:
            raise ProtocolError(f"slot size {plan.slot_bytes} is not a multiple of {misfit[0]}'s")
        self.plan = plan
        self.starts = [0, *itertools.accumulate(layout.counts)]
        self.rows = self._rows(plan)
        _remember((manifest, layout, plan.slot_bytes, self.itemsizes, self.starts, self.rows))

    def _rows(self, plan: wire.Plan) -> list[tuple]:
        """Per manifest tensor, what its view needs besides this update's buffer: (name, dtype
        index into ``self.kinds``, shape, contiguous strides, element offset in its slot)."""
        self.kinds = list(self.itemsizes)
        index = {d: i for i, d in enumerate(self.kinds)}
        strides: dict[tuple[int, ...], tuple[int, ...]] = {}
        for shape in set(plan.manifest.shapes):
            out, step = [], 1
            for d in reversed(shape):
                out.append(step)
                step *= max(d, 1)
            strides[shape] = tuple(reversed(out))
        m, sizes = plan.manifest, self.itemsizes
        return [
            (name, index[d], shape, strides[shape], off // sizes[d])
            for name, d, shape, off in zip(m.names, m.dtypes, m.shapes, plan.layout.offsets)
        ]

    def map_buffer(self, buffer: torch.Tensor) -> None:
        """Typed views of the whole IPC buffer, one per dtype of the manifest (in ``kinds``
        order), with their storage offsets and elements per slot."""
        self._typed = []
        for name in self.kinds:
            size = self.itemsizes[name]
            whole = buffer[: buffer.numel() // size * size].view(dtypes.to_torch(name))
            self._typed.append((whole, whole.storage_offset(), self.plan.slot_bytes // size))

    def views(self, msg: wire.Bucket) -> Weights:
        """The bucket's tensors: one ``as_strided`` view of the slot per tensor."""
        plan = self.plan
        if msg.update_id != plan.update_id or msg.id != self.next_bucket:
            raise ProtocolError(
                f"expected bucket {self.next_bucket} of {plan.update_id}, got {msg.id}"
            )
        if msg.id >= plan.num_buckets or msg.slot >= plan.num_slots:
            raise ProtocolError(f"bucket {msg.id} / slot {msg.slot} out of range")
        rows = self.rows[self.starts[msg.id] : self.starts[msg.id + 1]]
        self.next_bucket += 1
        if len(self._typed) == 1:
            t, base, per_slot = self._typed[0]
            base += msg.slot * per_slot
            return [(n, t.as_strided(sh, st, base + o)) for n, _, sh, st, o in rows]
        typed = [t for t, _, _ in self._typed]
        bases = [base + msg.slot * per_slot for _, base, per_slot in self._typed]
        return [(n, typed[i].as_strided(sh, st, bases[i] + o)) for n, i, sh, st, o in rows]

    def drop_views(self) -> None:
        """Let go of every view of the IPC buffer (before it is released)."""
        self._typed = []

    def check_complete(self) -> None:
        # Every manifest tensor is in exactly one bucket (checked with the plan), delivered
        # when its bucket was: complete iff every bucket arrived.
        if self.next_bucket != self.plan.num_buckets:
            missing = len(self.plan.manifest) - self.starts[self.next_bucket]
            raise ProtocolError(
                f"update ended after {self.next_bucket} of {self.plan.num_buckets} buckets; "
                f"{missing} tensors never delivered, e.g. "
                f"{list(self.plan.manifest.names[self.starts[self.next_bucket] :][:3])}"
            )

    def close(self) -> None:
        self.channel.close()


def update_weights_from_ipc(
    zmq_ctx: zmq.Context,
    zmq_handle: str,
    device_id: int,
    *,
    run: Callable[[Weights], None],
    post_hook: Callable[[], None] | None = None,
    validate: Callable[[list[TensorSpec]], None] | None = None,
    timeout_s: float | None = None,
    wire: str | None = None,
    keeps: Callable[[list[TensorSpec]], Mapping[str, tuple[int, int, int]]] | None = None,
) -> None:
    """Receive one update from the parameter server at ``zmq_handle``; see the module docstring.

    ``validate(manifest)``, if given, is called with every tensor (name, dtype, shape) the update
    will deliver, before the first bucket; if it raises, the update fails and nothing is written.
    ``timeout_s`` bounds the wait for the first message (default CKPT_ENGINE_WORKER_TIMEOUT_S or
    60 s); later waits use the limit the parameter server announces in its plan.

    ``keeps(manifest)``, if given, returns ``{name: (dim, start, length)}``: the only indices
    along ``dim`` of that tensor that ``run`` reads (a tensor-parallel rank's rows; tensors it
    reads whole are left out). Reported to the parameter server with the Ack of the plan; a P2P
    receiver then reads only those rows, and the rest of such a tensor's view holds whatever the
    slot held before: ``run`` must read nothing else of it.

    ``wire="upstream"`` (default: CKPT_ENGINE_WIRE, else ``"ckpt-engine"``) accepts an upstream
    checkpoint-engine 0.4.x ParameterServer instead: opt-in, unsafe against local attackers,
    and ``validate`` then runs only after the last bucket (see ckpt_engine.compat.worker).
    """
    chosen = check_wire(wire if wire is not None else (env.wire() or "ckpt-engine"))
    if chosen == "upstream":
        from ckpt_engine.compat.worker import update_weights_from_upstream_ipc

        return update_weights_from_upstream_ipc(
            zmq_ctx,
            zmq_handle,
            device_id,
            run=run,
            post_hook=post_hook,
            validate=validate,
            timeout_s=timeout_s,
        )
    _receive(zmq_ctx, zmq_handle, device_id, run, post_hook, validate, timeout_s, keeps)


def _receive(
    zmq_ctx: zmq.Context,
    zmq_handle: str,
    device_id: int,
    run: Callable[[Weights], None],
    post_hook: Callable[[], None] | None,
    validate: Callable[[list[TensorSpec]], None] | None,
    timeout_s: float | None,
    keeps: Callable[[list[TensorSpec]], Mapping[str, tuple[int, int, int]]] | None = None,
) -> None:
    """Our own wire (ckpt_engine.wire); ``wire`` above shadows the module's name."""
    first_timeout = env.resolve_worker_timeout_s(timeout_s, DEFAULT_FIRST_MESSAGE_TIMEOUT_S)
    leases.sweep_once(env.shm_dir(), env.socket_dir())  # what dead parameter servers left
    session = _Session(zmq_ctx, zmq_handle, device_id)
    buffer: torch.Tensor | None = None
    is_cuda = False
    try:
        failure: BaseException | None = None
        try:
            msg = session.recv(first_timeout)
        except ProtocolError as e:  # nothing was mapped nor written: end here, as an abort
            raise UpdateAborted(f"bad first message from {zmq_handle}: {e}") from e
        try:
            if not isinstance(msg, wire.Plan):
                raise ProtocolError(f"expected a plan first, got {msg.TYPE}")
            session.accept_plan(msg)
            if validate is not None:
                validate(msg.manifest.specs())
            is_cuda = isinstance(msg.buffer, wire.CudaBuffer)
            buffer = open_ipc_buffer(msg.buffer, device_id)
            session.map_buffer(buffer)
            kept = None if keeps is None else _keeps(msg.manifest, keeps(msg.manifest.specs()))
            session.send(wire.Ack(update_id=msg.update_id, of="plan", keeps=kept))
        except Exception as e:
            failure = e
            session.send(session.error("plan", e))
        timeout = session.plan.recv_timeout_s if session.plan is not None else first_timeout
        while True:
            try:
                msg = session.recv(timeout)
            except ProtocolError as e:  # undecodable: answer so the PS can abort us
                failure = failure or e
                session.send(session.error("protocol", e))
                continue
            if isinstance(msg, wire.Abort):
                session.send(wire.Ack(update_id=session.update_id, of="abort"))
                raise UpdateAborted(msg.reason) from failure
            if failure is not None:
                session.send(
                    session.error("protocol", ProtocolError(f"expected abort, got {msg.TYPE}"))
                )
                continue
            try:
                if isinstance(msg, wire.Bucket):
                    with paused_gc():
                        weights = session.views(msg)
                        run(weights)
                        del weights
                    if is_cuda:
                        torch.cuda.synchronize(device_id)
                    session.send(wire.Ack(update_id=session.update_id, of="bucket", id=msg.id))
                elif isinstance(msg, wire.Done):
                    session.check_complete()
                    buffer = None
                    session.drop_views()
                    # no view is left (no gc: tens of ms, far more in a serving engine)
                    release_ipc_buffer("cuda" if is_cuda else "cpu", device_id, collect=False)
                    session.released = True
                    session.send(wire.Ack(update_id=session.update_id, of="done"))
                elif isinstance(msg, wire.Commit) and session.released:
                    if post_hook is not None:
                        post_hook()
                    if is_cuda:
                        torch.cuda.synchronize(device_id)
                    session.send(wire.Ack(update_id=session.update_id, of="commit"))
                    return
                else:
                    raise ProtocolError(f"unexpected {msg.TYPE} message")
            except Exception as e:
                failure = e
                bucket = msg.id if isinstance(msg, wire.Bucket) else None
                stage = (
                    msg.TYPE
                    if isinstance(msg, (wire.Bucket, wire.Done, wire.Commit))
                    else "protocol"
                )
                logger.warning("update %s failed at %s %s: %s", session.update_id, stage, bucket, e)
                session.send(session.error(stage, e, bucket))
    finally:
        buffer = None
        session.drop_views()
        if not session.released:
            release_ipc_buffer("cuda" if is_cuda else "cpu", device_id)
        session.close()


def _keeps(manifest: wire.Manifest, kept: Mapping[str, tuple[int, int, int]]) -> wire.Keeps:
    """The worker's ``keeps`` answer as the Ack's columns (manifest indices); a name outside
    the manifest or rows outside the tensor are a bug of the engine's answer: refused here."""
    index = {name: i for i, name in enumerate(manifest.names)}
    cols: tuple[list[int], ...] = ([], [], [], [])
    for name, (dim, start, length) in kept.items():
        i = index.get(name)
        if i is None:
            raise ProtocolError(f"keeps: {name!r} is not in the update")
        shape = manifest.shapes[i]
        if not (
            0 <= dim < len(shape) and start >= 0 and length >= 0 and start + length <= shape[dim]
        ):
            raise ProtocolError(
                f"keeps: {name!r} rows {start}+{length} along dim {dim} of {list(shape)}"
            )
        for col, value in zip(cols, (i, dim, start, length), strict=True):
            col.append(value)
    return wire.Keeps(*map(tuple, cols))
