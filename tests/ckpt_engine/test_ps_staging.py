"""StagedReads: chunked background reads that the update's mover waits on range by range."""

import os
import time

import numpy as np
import pytest

from ckpt_engine.errors import CheckpointFileError
from ckpt_engine.ps import staging
from ckpt_engine.safetensors_io import ReadJob


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(staging, "READ_CHUNK_BYTES", 4096)


def _reads(tmp_path, sizes, threads=3):
    data, jobs = [], []
    for i, n in enumerate(sizes):
        blob = np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(b"HDR!" + blob.tobytes())
        dest = np.zeros(n, dtype=np.uint8)
        data.append((blob, dest))
        jobs.append(ReadJob(str(path), 4, memoryview(dest)))
    return data, staging.StagedReads(jobs, list(range(len(sizes))), threads=threads)


def test_every_range_is_read_when_its_wait_returns(small_chunks, tmp_path):
    data, reads = _reads(tmp_path, [30_001, 4096, 12_345])
    deadline = time.monotonic() + 60
    try:
        for buffer, (blob, dest) in enumerate(data):
            for start in range(0, len(blob), 3000):  # ranges across chunk bounds
                end = min(start + 3000, len(blob))
                reads.wait_range(buffer, start, end, deadline)
                assert np.array_equal(dest[start:end], blob[start:end])
        reads.wait_all(deadline)
        assert reads.complete and reads.finished is not None
    finally:
        reads.close()


def test_a_truncated_file_fails_the_wait_naming_it(small_chunks, tmp_path):
    _data, reads = _reads(tmp_path, [20_000])
    reads.close()
    path = tmp_path / "f0.bin"
    os.truncate(path, 10_000)
    dest = np.zeros(20_000, dtype=np.uint8)
    reads = staging.StagedReads([ReadJob(str(path), 4, memoryview(dest))], [0], threads=2)
    try:
        with pytest.raises(CheckpointFileError, match=r"f0\.bin"):
            reads.wait_range(0, 16_384, 20_000, time.monotonic() + 60)
    finally:
        reads.close()
