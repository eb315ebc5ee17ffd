import ctypes
import errno
import mmap
import os
import stat

import pytest
import torch

from ckpt_engine import host_memory


def test_shm_buffer_is_private_shared_and_unlinked(tmp_path):
    buf = host_memory.allocate(10_000, kind="shm", shm_dir=str(tmp_path), label="t", pin=False)
    assert buf.path is not None and os.path.basename(buf.path).startswith(host_memory.FILE_PREFIX)
    assert stat.S_IMODE(os.stat(buf.path).st_mode) == 0o600
    buf.tensor[:5] = torch.arange(5, dtype=torch.uint8)
    mv = buf.memoryview()
    mv[5] = 42
    mapped = torch.from_file(buf.path, shared=True, size=10_000, dtype=torch.uint8)
    assert mapped[:6].tolist() == [0, 1, 2, 3, 4, 42]
    buf.close()
    assert not os.path.exists(buf.path) and buf.closed
    buf.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        _ = buf.tensor


def test_shm_names_are_unguessable(tmp_path):
    a = host_memory.create_shm(1, shm_dir=str(tmp_path), label="same")
    b = host_memory.create_shm(1, shm_dir=str(tmp_path), label="same")
    assert a.path != b.path and len(os.path.basename(a.path)) > 32
    a.close()
    b.close()


def test_zero_bytes_and_anonymous(tmp_path):
    empty = host_memory.allocate(0, kind="shm", shm_dir=str(tmp_path), label="z", pin=False)
    assert empty.nbytes == 0 and empty.path is None
    anon = host_memory.allocate(100, kind="anonymous", shm_dir=str(tmp_path), label="a", pin=False)
    assert anon.nbytes == 100 and anon.path is None
    for b in (empty, anon):
        b.close()
    assert os.listdir(tmp_path) == []


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def test_anonymous_buffer_is_writable_and_populates_before_any_write():
    nbytes = 64 << 20
    buf = host_memory.create_anonymous(nbytes)
    assert buf.tensor.data_ptr() % mmap.PAGESIZE == 0
    before = _resident_bytes()
    for addr, n in buf.populate_chunks():
        host_memory._populate_range(addr, n)
    # every page is now backed (allow for the pages other threads free meanwhile)
    assert _resident_bytes() - before >= nbytes * 0.9
    buf.memoryview()[nbytes - 1] = 7
    buf.tensor[:3] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert buf.tensor[:3].tolist() == [1, 2, 3] and int(buf.tensor[-1]) == 7
    buf.close()


def test_populate_chunks_cover_the_buffer_exactly(monkeypatch):
    monkeypatch.setattr(host_memory, "POPULATE_CHUNK_BYTES", 4096)
    buf = host_memory.create_anonymous(3 * 4096 + 5)
    chunks = buf.populate_chunks()
    base = buf.tensor.data_ptr()
    assert chunks == [(base, 4096), (base + 4096, 4096), (base + 8192, 4096), (base + 12288, 5)]
    buf.close()


@pytest.mark.parametrize("threads", [1, 3])
def test_populate_all_populates_every_chunk_and_keeps_the_bytes(monkeypatch, threads):
    monkeypatch.setattr(host_memory, "POPULATE_CHUNK_BYTES", 1 << 20)
    bufs = [host_memory.create_anonymous(n) for n in (3 << 20, 0, (1 << 20) + 5)]
    bufs[0].tensor[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)  # reused: kept
    seen = []
    real = host_memory._populate_range
    monkeypatch.setattr(
        host_memory, "_populate_range", lambda a, n: (seen.append((a, n)), real(a, n))
    )
    assert host_memory.populate_all(bufs, threads=threads) >= 0
    assert sorted(seen) == sorted(c for b in bufs for c in b.populate_chunks())
    assert bufs[0].tensor[:4].tolist() == [1, 2, 3, 4] and not bool(bufs[2].tensor.any())
    for b in bufs:
        b.close()


class _FakeLibc:
    def __init__(self, code: int) -> None:
        self.code, self.calls = code, 0

    def madvise(self, addr, nbytes, advice):
        self.calls += 1
        ctypes.set_errno(self.code)
        return -1


def test_populate_without_kernel_support_leaves_faults_to_pinning(monkeypatch):
    fake = _FakeLibc(errno.EINVAL)
    monkeypatch.setattr(host_memory, "_libc", fake)
    monkeypatch.setattr(host_memory, "_populate_supported", True)
    host_memory._populate_range(4096, 4096)
    host_memory._populate_range(4096, 4096)  # not asked again
    assert fake.calls == 1 and host_memory._populate_supported is False


def test_populate_failure_is_an_error(monkeypatch):
    monkeypatch.setattr(host_memory, "_libc", _FakeLibc(errno.ENOMEM))
    monkeypatch.setattr(host_memory, "_populate_supported", True)
    with pytest.raises(OSError, match="populating 4096 bytes"):
        host_memory._populate_range(4096, 4096)


def test_unknown_kind():
    with pytest.raises(ValueError, match="shm, anonymous"):
        host_memory.allocate(8, kind="hugepages", shm_dir="/dev/shm", label="x", pin=False)


def test_shm_out_of_space_is_an_error_not_a_crash(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match="cannot reserve"):
        host_memory.create_shm(4096, shm_dir=str(tmp_path), label="full")
    assert os.listdir(tmp_path) == []


def test_in_place_mapping_keeps_the_file(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(bytes(range(100)))
    assert host_memory.in_shm_dir(str(path), str(tmp_path))
    assert not host_memory.in_shm_dir(str(path), str(tmp_path / "sub"))
    buf = host_memory.map_in_place(str(path), pin=False)
    assert buf.tensor[:4].tolist() == [0, 1, 2, 3] and buf.kind == "in_place"
    buf.close()
    assert path.exists()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["shm", "anonymous"])
def test_pinned_buffer_registers_and_unregisters(kind):
    # /dev/shm (tmpfs), as in production: cudaHostRegister refuses shared mappings of files on
    # some other file systems (CUDA error 1 seen for a file under /tmp on the GPU machine).
    buf = host_memory.allocate(1 << 20, kind=kind, shm_dir="/dev/shm", label="p", pin=True)
    assert buf.pinned
    dev = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    dev.copy_(buf.tensor, non_blocking=True)
    torch.cuda.synchronize()
    buf.close()


@pytest.mark.gpu
def test_pin_all_pins_every_kind_and_copies_exactly(tmp_path):
    path = "/dev/shm/" + host_memory.shm_file_name("test-pin-all")
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8)
    with open(path, "wb") as f:
        f.write(data.numpy().tobytes())
    try:
        bufs = [
            host_memory.map_in_place(path, pin=False),
            host_memory.allocate(5 << 20, kind="shm", shm_dir="/dev/shm", label="pa", pin=False),
            host_memory.allocate(
                7 << 20, kind="anonymous", shm_dir="/dev/shm", label="pa", pin=False
            ),
        ]
        bufs[1].tensor[: data.numel()].copy_(data)
        bufs[2].tensor[: data.numel()].copy_(data)
        host_memory.pin_all(bufs, threads=4)
        for buf in bufs:
            assert buf.pinned
            dev = torch.empty(data.numel(), dtype=torch.uint8, device="cuda")
            dev.copy_(buf.tensor[: data.numel()], non_blocking=True)
            torch.cuda.synchronize()
            assert torch.equal(dev.cpu(), data)
            buf.close()
    finally:
        os.unlink(path)
