"""Main loop of one tensor-parallel rank process.

Started by the launcher (multiprocessing, spawn) with one end of a pipe. It builds its
`RankWorker` (TP group, model, initial weights), answers `Ready` or `StartupFailed`, then serves
`Call`s one at a time until `Shutdown` or until the front's end of the pipe closes. It dies with
its parent (PR_SET_PDEATHSIG on Linux, and pipe EOF everywhere), so no rank outlives the server.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from workers.config import ServerArgs
from workers.errors import ProtocolError, WorkersError
from workers.server.messages import (
    MAX_FRAME_BYTES,
    Call,
    Failure,
    Message,
    Ready,
    Reply,
    Shutdown,
    StartupFailed,
    decode,
    encode,
)

logger = logging.getLogger(__name__)


def rank_main(rank: int, args: dict[str, Any], store_port: int, parent_pid: int, conn: Connection):
    _die_with_parent(parent_pid)
    server_args = ServerArgs.from_dict(args)
    logging.basicConfig(
        level=server_args.log_level.upper(),
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        from workers.server.worker import RankWorker

        worker = RankWorker.create(rank, server_args, store_port)
    except Exception as e:
        if isinstance(e, WorkersError):  # an expected failure: the message says it all
            logger.error("rank %d failed to start: %s", rank, describe(e))
        else:
            logger.exception("rank %d failed to start", rank)
        _send(conn, StartupFailed(rank=rank, error=describe(e)))
        sys.exit(1)
    _send(conn, Ready(rank=rank, device=str(worker.device), parameter_bytes=worker.parameter_bytes))
    try:
        serve(worker, conn)
    finally:
        from workers.distributed import destroy_tensor_parallel

        destroy_tensor_parallel()


def serve(worker, conn: Connection) -> None:
    while True:
        try:
            msg = decode(conn.recv_bytes(MAX_FRAME_BYTES))
        except (EOFError, OSError):
            logger.info("rank %d: the front closed the pipe; exiting", worker.tp.rank)
            return
        if isinstance(msg, Shutdown):
            return
        if not isinstance(msg, Call):
            raise ProtocolError(f"a rank expects Call or Shutdown, got {type(msg).__name__}")
        _send(conn, handle(worker, msg))


def handle(worker, call: Call) -> Reply | Failure:
    rank = worker.tp.rank
    before = worker.tensors_written
    try:
        reply = Reply(
            seq=call.seq, rank=rank, value=worker.call(call.method, call.args, call.kwargs)
        )
        encode(reply)  # a value that cannot cross the pipe is this call's failure
        return reply
    except Exception as e:
        logger.warning("rank %d: %s failed: %s", rank, call.method, describe(e))
        return Failure(
            seq=call.seq,
            rank=rank,
            error=describe(e),
            weights_modified=worker.tensors_written != before,
        )


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _send(conn: Connection, msg: Message) -> None:
    conn.send_bytes(encode(msg))


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
