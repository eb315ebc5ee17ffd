"""Batched host copies (ckpt_engine.ps.hostcopy): the pure batching and partial-count logic,
then real copies by process_vm_writev and by the memmove fallback, bit for bit."""

import ctypes
import errno

import numpy as np
import pytest
import torch

from ckpt_engine.errors import HostCopyError
from ckpt_engine.ps import hostcopy


def rows(*triples):
    return np.asarray(triples, dtype=np.int64).reshape(-1, 3)


def test_as_jobs_takes_lists_arrays_and_nothing():
    assert hostcopy.as_jobs([]).shape == (0, 3)
    assert hostcopy.as_jobs([[1, 2, 3]]).tolist() == [[1, 2, 3]]
    assert hostcopy.as_jobs(rows([4, 5, 6])).tolist() == [[4, 5, 6]]


@pytest.mark.parametrize(
    ("jobs", "piece", "expected"),
    [
        ([[100, 1000, 10]], 4, [[100, 1000, 4], [104, 1004, 4], [108, 1008, 2]]),
        ([[0, 50, 8], [9, 70, 3]], 4, [[0, 50, 4], [4, 54, 4], [9, 70, 3]]),
        ([[0, 50, 4], [9, 70, 0]], 4, [[0, 50, 4], [9, 70, 0]]),
        ([], 4, []),
    ],
)
def test_split_large_cuts_long_rows_into_pieces(jobs, piece, expected):
    assert hostcopy.split_large(hostcopy.as_jobs(jobs), piece).tolist() == expected


@pytest.mark.parametrize(
    ("sizes", "max_ranges", "max_bytes", "expected"),
    [
        ([1] * 10, 4, 100, [(0, 4), (4, 8), (8, 10)]),  # by count
        ([5, 5, 5, 5], 10, 10, [(0, 2), (2, 4)]),  # by bytes
        ([50, 1, 1], 10, 10, [(0, 1), (1, 3)]),  # a larger row alone
        ([1, 50, 1], 10, 10, [(0, 1), (1, 2), (2, 3)]),
        ([], 10, 10, []),
    ],
)
def test_batches_bound_count_and_bytes_and_cover_every_row(sizes, max_ranges, max_bytes, expected):
    jobs = rows(*[[0, 0, n] for n in sizes])
    assert hostcopy.batches(jobs, max_ranges=max_ranges, max_bytes=max_bytes) == expected


def test_iovecs_are_base_length_pairs():
    vec = hostcopy.iovecs(np.array([16, 32]), np.array([3, 4]))
    assert vec.dtype == np.uint64 and vec.tolist() == [[16, 3], [32, 4]]
    assert vec.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize(
    ("copied", "expected"),
    [
        (0, [[0, 100, 10], [50, 200, 5]]),
        (4, [[4, 104, 6], [50, 200, 5]]),
        (10, [[50, 200, 5]]),
        (12, [[52, 202, 3]]),
        (15, []),
    ],
)
def test_remaining_continues_from_the_first_byte_not_copied(copied, expected):
    assert hostcopy.remaining(rows([0, 100, 10], [50, 200, 5]), copied).tolist() == expected


def scattered(count: int, seed: int = 0):
    """Source tensors of assorted sizes (some empty) and a destination with gaps: the rows
    copying each into it, and the expected destination bytes."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 3000, (count,), generator=gen).tolist()
    sizes[::7] = [0] * len(sizes[::7])
    srcs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in sizes]
    offsets = np.cumsum([0] + [n + 13 for n in sizes])
    dst = torch.zeros(int(offsets[-1]), dtype=torch.uint8)
    expected = dst.clone()
    jobs = []
    for src, off in zip(srcs, offsets):
        jobs.append([dst.data_ptr() + int(off), src.data_ptr(), src.numel()])
        expected[int(off) : int(off) + src.numel()] = src
    return dst, expected, jobs, srcs


@pytest.mark.parametrize("method", ["writev", "readv", "memmove"])
@pytest.mark.parametrize("threads", [1, 3])
def test_copy_ranges_is_exact_both_ways(monkeypatch, method, threads):
    if method != "memmove" and hostcopy.method == "memmove":
        pytest.skip("process_vm_writev/readv are not available here")
    monkeypatch.setattr(hostcopy, "method", method)
    monkeypatch.setattr(hostcopy, "BATCH_BYTES", 20_000)  # many batches, some rows split
    dst, expected, jobs, _ = scattered(3000)
    copied = []
    hostcopy.copy_ranges(jobs, threads=threads, on_copied=copied.append)
    assert torch.equal(dst, expected)
    assert sum(copied) == sum(n for _, _, n in jobs) and len(copied) > 10
    assert hostcopy.method == method


@pytest.mark.parametrize(
    ("method", "fault_in", "call"),
    [
        ("auto", True, "readv"),
        ("auto", False, "writev"),
        ("writev", True, "writev"),
        ("readv", False, "readv"),
        ("memmove", True, "memmove"),
    ],
)
def test_auto_reads_into_new_buffers_and_writes_into_others(monkeypatch, method, fault_in, call):
    monkeypatch.setattr(hostcopy, "method", method)
    assert hostcopy.call_for(fault_in=fault_in) == call


def fake_writev(behaviour):
    """A stand-in for the syscall: ``behaviour(local_rows) -> (result, errno)``, where
    local_rows are the (src, nbytes) pairs it was given."""

    def call(pid, local, count, remote, rcount, flags):
        loc = np.ctypeslib.as_array((ctypes.c_uint64 * (2 * count)).from_address(local))
        rem = np.ctypeslib.as_array((ctypes.c_uint64 * (2 * rcount)).from_address(remote))
        result, code = behaviour(loc.reshape(-1, 2), rem.reshape(-1, 2))
        ctypes.set_errno(code)
        return result

    return call


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EPERM, errno.EACCES])
def test_a_refused_call_falls_back_to_memmove_for_good(monkeypatch, code):
    calls = []

    def refuse(loc, rem):
        calls.append(len(loc))
        return -1, code

    monkeypatch.setattr(hostcopy, "method", "writev")
    monkeypatch.setattr(hostcopy, "_writev", fake_writev(refuse))
    dst, expected, jobs, _ = scattered(500, seed=1)
    hostcopy.copy_ranges(jobs, threads=1, on_copied=lambda n: None)
    assert torch.equal(dst, expected)
    assert hostcopy.method == "memmove" and len(calls) == 1  # not tried again


def test_a_short_count_is_continued(monkeypatch):
    """The fake copies only the first range given, and only half of it when it is long."""
    given = []

    def short(loc, rem):
        given.append(len(loc))
        n = int(loc[0, 1])
        n = n // 2 if n > 100 else n
        ctypes.memmove(int(rem[0, 0]), int(loc[0, 0]), n)
        return n, 0

    monkeypatch.setattr(hostcopy, "method", "writev")
    monkeypatch.setattr(hostcopy, "_writev", fake_writev(short))
    dst, expected, jobs, _ = scattered(40, seed=2)
    hostcopy.copy_ranges(jobs, threads=1, on_copied=lambda n: None)
    assert torch.equal(dst, expected)
    assert len(given) > 40 and hostcopy.method == "writev"


@pytest.mark.parametrize(
    ("result", "code", "match"),
    [(0, 0, "copied nothing"), (-1, errno.EFAULT, "Bad address")],
)
def test_no_progress_or_a_bad_address_raises(monkeypatch, result, code, match):
    monkeypatch.setattr(hostcopy, "method", "writev")
    monkeypatch.setattr(hostcopy, "_writev", fake_writev(lambda loc, rem: (result, code)))
    _dst, _, jobs, _srcs = scattered(20, seed=3)
    with pytest.raises(HostCopyError, match=match):
        hostcopy.copy_ranges(jobs, threads=2, on_copied=lambda n: None)


def test_the_real_call_reports_a_bad_address():
    if hostcopy.method == "memmove":
        pytest.skip("process_vm_writev is not available here")
    dst = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(HostCopyError, match="Bad address"):
        hostcopy.copy_batch(rows([dst.data_ptr(), 4096, 64]))  # page 1 is never mapped
