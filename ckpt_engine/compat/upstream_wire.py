"""The upstream checkpoint-engine 0.4.x wire (broadcast path) as a codec: objects <-> bytes.

Written from reading upstream's ``ps.py`` / ``worker.py`` (0.4.1 = 0.4.2 for these files; see
docs/ecosystem_interfaces.md section 1); no upstream code is used. The only module, with
compat/worker.py, that touches pickle, and only for a caller who opted in (see compat/__init__).

One REQ (parameter server, binds ``ipc://@checkpoint-engine-<device uuid>-<counter>.sock``) /
REP (worker, connects) pair per device. Every PS message is ``pickle.dumps(obj,
pickle.DEFAULT_PROTOCOL)`` (what pyzmq's ``send_pyobj`` sends); every worker reply is raw bytes,
``b""`` for success or the UTF-8 traceback of the failure::

    PS -> W  (rebuild_cuda_tensor, (15 args of reduce_tensor))   W -> PS  b"" | traceback [1]
    PS -> W  [{"name", "dtype": torch.dtype, "shape": torch.Size, "offset": int}, ...]
                                                                 W -> PS  b"" | traceback [2]
    ...      (one list per bucket; ``offset`` counts from the start of the whole buffer)
    PS -> W  None   (release the buffer)                         W -> PS  b""
    PS -> W  None   (run post_hook)                              W -> PS  b"", W returns
  after a failure, instead of the next message:
    PS -> W  RuntimeError("Some workers failed to update weights")   no reply; W raises it

[1] after a traceback here the worker waits for one more message (any) and raises its own error.
[2] after a traceback here the worker stays in its loop and waits for the PS's exception.

On CPU upstream has no IPC path. Our stand-in handle has the same shape, a 2-tuple
``(rebuild_shm_tensor, args)`` whose 15 args follow ``rebuild_cuda_tensor``'s order, with the
shared-memory file's path where the CUDA IPC handle goes; only our worker understands it.
"""

from __future__ import annotations

import builtins
import io
import pickle
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from ckpt_engine import dtypes
from ckpt_engine.errors import ProtocolError
from ckpt_engine.ipc import open_ipc_buffer
from ckpt_engine.wire import ShmBuffer, TensorSpec

ADDRESS_FORMAT = "ipc://@checkpoint-engine-{device_uuid}-{counter}.sock"
ABORT_MESSAGE = "Some workers failed to update weights"
OK = b""
HANDLE_ARGS = 15
DEVICE_ARG = 6  # the worker replaces args[6] (storage_device) with its own device index


def address(device_uuid: str, counter: int) -> str:
    """The socket name upstream's ``_bind_zmq_socket`` uses for ``counter``-th update."""
    return ADDRESS_FORMAT.format(device_uuid=device_uuid, counter=counter)


def _dumps(obj: object, protocol: int | None) -> bytes:
    return pickle.dumps(obj, pickle.DEFAULT_PROTOCOL if protocol is None else protocol)


# -- parameter-server side ---------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """A PS message already encoded (``kind``: handle | bucket), for the compat link to send."""

    kind: str
    data: bytes


def encode_cuda_handle(buffer: torch.Tensor, *, protocol: int | None = None) -> bytes:
    """Upstream's first message: ``reduce_tensor`` of the whole IPC buffer, pickled."""
    return _dumps(reduce_tensor(buffer), protocol)


def rebuild_shm_tensor(
    tensor_cls, size, stride, tensor_offset, storage_cls, dtype, device, path, nbytes, *_rest
) -> torch.Tensor:
    """CPU stand-in for ``rebuild_cuda_tensor``: map our shared-memory IPC file (checked)."""
    if not isinstance(path, str) or not isinstance(nbytes, int):
        raise ProtocolError("malformed shared-memory handle")
    return open_ipc_buffer(ShmBuffer(path=path, nbytes=nbytes), int(device))


def encode_shm_handle(
    path: str, nbytes: int, device_index: int, *, protocol: int | None = None
) -> bytes:
    args = (
        torch.Tensor, torch.Size([nbytes]), (1,), 0, torch.storage.UntypedStorage, torch.uint8,
        device_index, path, nbytes, 0, False, b"", 0, b"", False,
    )  # fmt: skip
    return _dumps((rebuild_shm_tensor, args), protocol)


def encode_bucket(
    items: Iterable[tuple[str, str, tuple[int, ...], int]], *, protocol: int | None = None
) -> bytes:
    """One bucket's metadata from (name, safetensors dtype, shape, absolute offset) records;
    dict keys in upstream's order (``_to_named_tensor``)."""
    metas = [
        {"name": name, "dtype": dtypes.to_torch(dtype), "shape": torch.Size(shape), "offset": off}
        for name, dtype, shape, off in items
    ]
    return _dumps(metas, protocol)


def encode_none(*, protocol: int | None = None) -> bytes:
    return _dumps(None, protocol)


def encode_abort(reason: str = "", *, protocol: int | None = None) -> bytes:
    """Upstream's abort; our ``reason``, if any, follows its text (the worker raises it)."""
    return _dumps(RuntimeError(f"{ABORT_MESSAGE}: {reason}" if reason else ABORT_MESSAGE), protocol)


def decode_reply(data: bytes) -> str | None:
    """A worker's reply: None for success, else its traceback text."""
    return None if data == OK else data.decode("utf-8", errors="replace")


def summary(traceback_text: str) -> str:
    """The last non-empty line of a traceback (``ValueError: ...``)."""
    lines = [line for line in traceback_text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(empty reply)"


# -- worker side -------------------------------------------------------------------------------
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch", "Size"): torch.Size,
    ("torch", "Tensor"): torch.Tensor,
    ("torch._tensor", "Tensor"): torch.Tensor,
    ("torch.storage", "TypedStorage"): torch.storage.TypedStorage,
    ("torch.storage", "UntypedStorage"): torch.storage.UntypedStorage,
    ("torch", "UntypedStorage"): torch.storage.UntypedStorage,
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"): rebuild_cuda_tensor,
    (__name__, "rebuild_shm_tensor"): rebuild_shm_tensor,
}
_REBUILDERS = (rebuild_cuda_tensor, rebuild_shm_tensor)


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals the upstream wire uses: no code of the sender's choosing."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "builtins":
            obj = getattr(builtins, name, None)
            if isinstance(obj, type) and issubclass(obj, Exception):
                return obj
        raise ProtocolError(f"refusing to unpickle {module}.{name}: not part of the upstream wire")


def decode(data: bytes) -> object:
    """Unpickle one PS message through the allowlist; ProtocolError if it is anything else."""
    try:
        return _Unpickler(io.BytesIO(data)).load()
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"undecodable upstream message: {type(e).__name__}: {e}") from e


def rebuild_handle(payload: object, device_id: int) -> tuple[torch.Tensor, bool]:
    """Map the buffer of a handle message on ``device_id``; (buffer, is_cuda)."""
    if not (isinstance(payload, tuple) and len(payload) == 2):
        raise ProtocolError(f"expected an IPC handle (func, args) first, got {type(payload)}")
    func, args = payload
    if func not in _REBUILDERS or not isinstance(args, tuple) or len(args) != HANDLE_ARGS:
        raise ProtocolError("IPC handle is not (rebuild function, 15 args)")
    if args[0] is not torch.Tensor or args[5] != torch.uint8:
        raise ProtocolError("IPC handle is not of a plain uint8 tensor")
    args = (*args[:DEVICE_ARG], device_id, *args[DEVICE_ARG + 1 :])
    buffer = func(*args)
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ProtocolError(f"IPC buffer is {buffer.dtype} of {buffer.dim()} dims, not 1-D uint8")
    return buffer, func is rebuild_cuda_tensor


Weights = list[tuple[str, torch.Tensor]]


def bucket_views(payload: list, buffer: torch.Tensor) -> tuple[Weights, list[TensorSpec]]:
    """Views into ``buffer`` for one bucket's metadata list, each entry checked."""
    weights: Weights = []
    specs: list[TensorSpec] = []
    for item in payload:
        if not isinstance(item, dict) or not {"name", "dtype", "shape", "offset"} <= set(item):
            raise ProtocolError(f"bucket entry is not a name/dtype/shape/offset dict: {item!r}")
        name, dtype, shape, offset = item["name"], item["dtype"], item["shape"], item["offset"]
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}")
        if not isinstance(name, str) or not isinstance(dtype, torch.dtype):
            raise ProtocolError(f"bucket entry has a bad name or dtype: {name!r} {dtype!r}")
        if not isinstance(offset, int) or offset < 0 or offset % dtype.itemsize:
            raise ProtocolError(f"tensor {name!r}: bad offset {offset!r}")
        shape = torch.Size(shape)
        nbytes = shape.numel() * dtype.itemsize
        if offset + nbytes > buffer.numel():
            raise ProtocolError(f"tensor {name!r} overruns the {buffer.numel()}-byte buffer")
        view = buffer[offset : offset + nbytes].view(dtype).view(shape)
        weights.append((name, view))
        specs.append(TensorSpec(name, dtypes.from_torch(dtype), tuple(shape)))
    return weights, specs


def encode_failure(exc: BaseException) -> bytes:
    """A worker's failure reply: the traceback, UTF-8 (never empty, so never read as success)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return (text or repr(exc)).encode("utf-8")
