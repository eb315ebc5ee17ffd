"""Many scattered host-to-host copies in few calls: ``process_vm_readv`` / ``process_vm_writev``
on our own process.

Registering 10^5 separately allocated named tensors (MoE experts) copies each into the rank's
host buffers. One ``ctypes.memmove`` a tensor takes and drops the interpreter lock per tensor:
on the H200 host 16 threads copied 150,000 tensors of 143 KB at 17 GB/s (1.14-1.32 s for
21.5 GB), bound by the lock's hand-offs. ``process_vm_writev(getpid(), local, n, remote, n, 0)``
and ``process_vm_readv`` copy up to ``IOV_MAX`` (1024) ranges in one system call without the
lock (a process may always access its own memory); the iovec arrays are built from address
columns with numpy. The kernel pins the *remote* side's pages page by page and faults the
*local* side's in as any user copy does (huge pages where the mapping has them). So
``method = "auto"`` (the default) copies into a registration's new buffers by readv (our
buffers local: their pages faulted in by the copy itself, on the copy threads; the registry
pins them after the copies) and into pinned, populated ones by writev (our buffers remote).

Measured on 1x H200's host (16 threads, 150,000 x 143 KiB, 21.5 GB; bench/register_named.py,
bench/RESULTS.md): into new buffers, readv then pin 1.63-2.13 s in all against writev after
populating and pinning 1.86-3.13 s; into the pool's pinned buffers writev 0.86-1.44 s, readv
0.93-2.14 s, memmove a tensor 3.9-4.6 s. On CPU (a 2-core VM, best of 3, populated
destinations):

| ranges | threads | memmove a range | process_vm_readv | process_vm_writev | one memmove |
|---|---|---|---|---|---|
| 150,000 x 16 KiB | 1 | 0.61 s | 0.76 s | **0.52 s** | 0.28 s |
| 150,000 x 16 KiB | 2 | 0.61 s | 0.42 s | **0.31 s** | 0.17 s |
| 15,000 x 143 KiB | 1 | 0.37-0.46 s | 0.55-0.59 s | 0.40-0.45 s | 0.24-0.27 s |
| 15,000 x 143 KiB | 2 | 0.26-0.32 s | 0.35-0.36 s | 0.29-0.31 s | 0.14-0.17 s |

Where a call is missing or refused (ENOSYS; EPERM or EACCES under a seccomp or Yama policy)
every later copy uses ``memmove``, logged once. A short count (the kernel stops at a fault or
at about 2 GiB a call) is retried from where it stopped; a call that makes no progress raises
HostCopyError.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ckpt_engine.errors import HostCopyError

logger = logging.getLogger(__name__)

IOV_MAX = 1024  # ranges one process_vm_writev takes (Linux UIO_MAXIOV)
BATCH_BYTES = 64 << 20  # bytes of one call at most: batches small enough to share among threads
_REFUSED = (errno.ENOSYS, errno.EPERM, errno.EACCES)

_libc = ctypes.CDLL(None, use_errno=True)
_writev = getattr(_libc, "process_vm_writev", None)
_readv = getattr(_libc, "process_vm_readv", None)
for _call in (_writev, _readv):
    if _call is not None:
        _call.restype = ctypes.c_ssize_t
        _call.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_ulong,
        ]

# "auto" (readv into buffers whose pages the copy faults in, else writev) until a call is
# found missing or refused, then "memmove"; "writev" or "readv": always that call (tests, bench)
method = "auto" if _writev is not None and _readv is not None else "memmove"


def call_for(*, fault_in: bool) -> str:
    """The copy ``copy_ranges`` makes under ``method``: ``fault_in`` says that the destinations
    are new buffers whose pages the copy is to fault in (readv does, as huge pages, on the copy
    threads; writev pins them one page at a time)."""
    if method == "auto":
        return "readv" if fault_in else "writev"
    return method


def as_jobs(jobs: object) -> np.ndarray:
    """``[dst, src, nbytes]`` rows (a list of triples or an array) as an int64 array (k, 3)."""
    return np.asarray(jobs, dtype=np.int64).reshape(-1, 3)


def split_large(jobs: np.ndarray, piece: int = BATCH_BYTES) -> np.ndarray:
    """Rows of more than ``piece`` bytes cut into pieces of ``piece`` bytes (the last shorter),
    so that one merged run (views of a trainer's flat buffer) is shared among the threads."""
    counts = np.maximum(1, -(-jobs[:, 2] // piece))
    if counts.max(initial=1) == 1:
        return jobs
    rows = np.repeat(jobs, counts, axis=0)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    skip = (np.arange(len(rows)) - first) * piece  # bytes before each piece in its row
    rows[:, 0] += skip
    rows[:, 1] += skip
    rows[:, 2] = np.minimum(rows[:, 2] - skip, piece)
    return rows


def batches(jobs: np.ndarray, *, max_ranges: int = IOV_MAX, max_bytes: int = BATCH_BYTES):
    """``(start, stop)`` row slices of at most ``max_ranges`` rows and about ``max_bytes``
    bytes (a single larger row makes a batch of its own), in order, covering every row."""
    ends = np.cumsum(jobs[:, 2])
    out, start, done = [], 0, 0
    while start < len(jobs):
        stop = int(np.searchsorted(ends, done + max_bytes, side="right"))
        stop = min(max(stop, start + 1), start + max_ranges)
        out.append((start, stop))
        done, start = int(ends[stop - 1]), stop
    return out


def iovecs(addresses: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """A C ``struct iovec[]`` (base, length: two 64-bit words each) of the ranges."""
    vec = np.empty((len(addresses), 2), dtype=np.uint64)
    vec[:, 0] = addresses
    vec[:, 1] = nbytes
    return vec


def copy_batch(jobs: np.ndarray, call: str | None = None) -> None:
    """Copy one batch (at most IOV_MAX rows) by process_vm_writev or process_vm_readv
    (``call``, default ``call_for(fault_in=False)``), or by memmove once those are unavailable;
    a short count is continued from the first byte not copied."""
    global method
    jobs = jobs[jobs[:, 2] > 0]
    pid = os.getpid()
    call = call or call_for(fault_in=False)
    while len(jobs) and call in ("writev", "readv") and method != "memmove":
        dst, src = iovecs(jobs[:, 0], jobs[:, 2]), iovecs(jobs[:, 1], jobs[:, 2])
        # writev: our sources are the local side; readv: our destinations are
        fn, local, remote = (_writev, src, dst) if call == "writev" else (_readv, dst, src)
        got = fn(pid, local.ctypes.data, len(jobs), remote.ctypes.data, len(jobs), 0)
        if got < 0:
            code = ctypes.get_errno()
            if code not in _REFUSED:
                raise HostCopyError(
                    f"process_vm_{call} of {len(jobs)} ranges failed: {os.strerror(code)} "
                    f"(first range: {int(jobs[0, 2])} bytes from {int(jobs[0, 1]):#x} to "
                    f"{int(jobs[0, 0]):#x})"
                )
            logger.info("process_vm_%s unavailable (%s): memmove a range", call, os.strerror(code))
            method = "memmove"
            break
        if got == 0:
            raise HostCopyError(
                f"process_vm_{call} copied nothing of {int(jobs[:, 2].sum())} bytes in "
                f"{len(jobs)} ranges"
            )
        jobs = remaining(jobs, got)
    for dst, src, nbytes in jobs.tolist():
        ctypes.memmove(dst, src, nbytes)


def remaining(jobs: np.ndarray, copied: int) -> np.ndarray:
    """The rows still to copy once the first ``copied`` bytes of ``jobs`` (in order) are."""
    ends = np.cumsum(jobs[:, 2])
    first = int(np.searchsorted(ends, copied, side="right"))
    rest = jobs[first:].copy()
    if len(rest):
        done = copied - (int(ends[first - 1]) if first else 0)
        rest[0] += (done, done, -done)
    return rest


def copy_ranges(
    jobs: object, *, threads: int, on_copied: Callable[[int], None], fault_in: bool = False
) -> None:
    """Copy every ``[dst, src, nbytes]`` row on ``threads`` threads, in batches of at most
    IOV_MAX ranges and about BATCH_BYTES bytes; ``on_copied(bytes)`` after each batch;
    ``fault_in``: see ``call_for``."""
    call = call_for(fault_in=fault_in)
    rows = split_large(as_jobs(jobs), BATCH_BYTES)
    if not len(rows):
        return
    parts = [rows[a:b] for a, b in batches(rows, max_bytes=BATCH_BYTES)]

    def run(part: np.ndarray) -> None:
        copy_batch(part, call)
        on_copied(int(part[:, 2].sum()))

    if threads <= 1 or len(parts) == 1:
        for part in parts:
            run(part)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(parts))) as pool:
        list(pool.map(run, parts))
