"""A transcript of the upstream checkpoint-engine 0.4.2 wire, written by hand.

Written from reading upstream's ``ps.py`` (``ParameterServer._update_per_bucket``,
``_bind_zmq_socket``, ``_to_named_tensor``) and ``worker.py`` (``update_weights_from_ipc``,
``_rebuild_ipc``, ``_extract_weights``) in the 0.4.2 wheel; nothing here was produced by
running upstream code (which has no CPU path). See docs/ecosystem_interfaces.md section 1.

A transcript is a list of frames of one update over one device's REQ (PS) / REP (worker) pair,
in order: ``("ps", kind)`` with kind ``handle`` | ``bucket`` | ``release`` | ``post_hook`` |
``abort``, and ``("worker", OK | TRACEBACK)`` for the worker's raw reply (or ``HANGS_UP``).
"""

from __future__ import annotations

OK = b""
TRACEBACK = "traceback"  # any non-empty UTF-8 reply: the worker's formatted traceback
HANGS_UP = "hangs up"  # no reply: the worker raised and closed its socket

ADDRESS = "ipc://@checkpoint-engine-{uuid}-{counter}.sock"  # abstract; counter 0, 1, ... per bind


def success(buckets: int) -> list[tuple]:
    """Handle, one list per bucket, then the two None messages; every reply b""."""
    frames: list[tuple] = [("ps", "handle"), ("worker", OK)]
    for _ in range(buckets):
        frames += [("ps", "bucket"), ("worker", OK)]
    return [*frames, ("ps", "release"), ("worker", OK), ("ps", "post_hook"), ("worker", OK)]


def run_fails(buckets: int, at: int) -> list[tuple]:
    """``run`` raises on bucket ``at``: the worker answers its traceback and stays in its loop;
    the PS answers with the pickled RuntimeError, which the worker raises (no reply)."""
    frames: list[tuple] = [("ps", "handle"), ("worker", OK)]
    for k in range(buckets):
        frames += [("ps", "bucket"), ("worker", TRACEBACK if k == at else OK)]
        if k == at:
            return [*frames, ("ps", "abort")]
    raise ValueError("at must be below buckets")


def hook_fails(buckets: int, stage: str) -> list[tuple]:
    """Releasing the buffer (``release``) or ``post_hook`` raises in the worker: upstream's worker
    has no handler there, so it raises without a reply and closes its socket (the PS sees it go).
    """
    frames = success(buckets)
    cut = frames.index(("ps", stage)) + 1
    return [*frames[:cut], ("worker", HANGS_UP)]


def handle_fails() -> list[tuple]:
    """The worker cannot map the buffer: it answers its traceback, waits for one more message
    (the PS's RuntimeError), then raises its own error."""
    return [("ps", "handle"), ("worker", TRACEBACK), ("ps", "abort")]


# -- bytes -------------------------------------------------------------------------------------
# The PS sends with pyzmq's send_pyobj: pickle.dumps(obj, pickle.DEFAULT_PROTOCOL), which is 4 on
# Python 3.8-3.13. Assembled opcode by opcode (pickletools names), protocol 4.

# None: PROTO 4, NONE, STOP (too short for a FRAME).
NONE_P4 = b"\x80\x04" + b"N" + b"."

_ABORT_TEXT = b"Some workers failed to update weights"
# RuntimeError("Some workers failed to update weights"): STACK_GLOBAL builtins.RuntimeError,
# the text as a 1-tuple, REDUCE. Every object is memoized (MEMOIZE, \x94) as it is pushed.
_abort_body = (
    b"\x8c\x08builtins\x94"  # SHORT_BINUNICODE 'builtins', MEMOIZE
    b"\x8c\x0cRuntimeError\x94"  # SHORT_BINUNICODE 'RuntimeError', MEMOIZE
    b"\x93\x94"  # STACK_GLOBAL, MEMOIZE
    + b"\x8c"
    + bytes([len(_ABORT_TEXT)])
    + _ABORT_TEXT
    + b"\x94"  # SHORT_BINUNICODE text, MEMOIZE
    b"\x85\x94"  # TUPLE1, MEMOIZE
    b"R\x94"  # REDUCE, MEMOIZE
    b"."  # STOP
)
ABORT_P4 = b"\x80\x04" + b"\x95" + (len(_abort_body)).to_bytes(8, "little") + _abort_body

# [{"name": "a", "dtype": torch.bfloat16, "shape": torch.Size([2, 3]), "offset": 0}]: the keys in
# _to_named_tensor's order; torch.bfloat16 pickles as the global torch.bfloat16, torch.Size as
# REDUCE(torch.Size, ((2, 3),)).
_bucket_body = (
    b"]\x94"  # EMPTY_LIST, MEMOIZE
    b"}\x94"  # EMPTY_DICT, MEMOIZE
    b"("  # MARK
    b"\x8c\x04name\x94" b"\x8c\x01a\x94"
    b"\x8c\x05dtype\x94" b"\x8c\x05torch\x94" b"\x8c\x08bfloat16\x94" b"\x93\x94"
    b"\x8c\x05shape\x94" b"\x8c\x05torch\x94" b"\x8c\x04Size\x94" b"\x93\x94"
    b"K\x02" b"K\x03" b"\x86\x94"  # BININT1 2, BININT1 3, TUPLE2, MEMOIZE
    b"\x85\x94" b"R\x94"  # TUPLE1, MEMOIZE, REDUCE, MEMOIZE
    b"\x8c\x06offset\x94" b"K\x00"
    b"u"  # SETITEMS
    b"a"  # APPEND
    b"."  # STOP
)  # fmt: skip
BUCKET_P4 = b"\x80\x04" + b"\x95" + (len(_bucket_body)).to_bytes(8, "little") + _bucket_body
