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
