import os

import pytest
import torch

from ckpt_engine import host_memory
from ckpt_engine.errors import ProtocolError
from ckpt_engine.ipc import IpcBuffer, open_ipc_buffer
from ckpt_engine.wire import ShmBuffer


def test_cpu_buffer_is_shared_with_the_worker_view(tmp_path):
    ipc = IpcBuffer("cpu", 0, 4096, shm_dir=str(tmp_path), label="t")
    assert isinstance(ipc.handle, ShmBuffer) and ipc.handle.nbytes == 4096
    worker_view = open_ipc_buffer(ipc.handle, device_id=0)
    ipc.tensor[100:104] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert worker_view[100:104].tolist() == [1, 2, 3, 4]
    del worker_view
    ipc.close()
    assert not os.path.exists(ipc.handle.path)
    ipc.close()


@pytest.mark.parametrize("case", ["no_prefix", "relative", "wrong_size", "symlink", "missing"])
def test_worker_refuses_suspicious_paths(tmp_path, case):
    good = host_memory.create_shm(64, shm_dir=str(tmp_path), label="g")
    if case == "no_prefix":
        other = tmp_path / "passwd"
        other.write_bytes(b"\0" * 64)
        handle = ShmBuffer(str(other), 64)
    elif case == "relative":
        handle = ShmBuffer(os.path.basename(good.path), 64)
    elif case == "wrong_size":
        handle = ShmBuffer(good.path, 128)
    elif case == "symlink":
        link = tmp_path / (host_memory.FILE_PREFIX + "link")
        link.symlink_to(good.path)
        handle = ShmBuffer(str(link), 64)
    else:
        handle = ShmBuffer(str(tmp_path / (host_memory.FILE_PREFIX + "gone")), 64)
    with pytest.raises(ProtocolError):
        open_ipc_buffer(handle, device_id=0)
    assert os.path.getsize(good.path) == 64  # never resized
    good.close()


@pytest.mark.gpu
def test_cuda_buffer_exports_plain_fields():
    ipc = IpcBuffer("cuda", 0, 1 << 20, shm_dir="/dev/shm", label="g")
    assert ipc.handle.nbytes == 1 << 20 and isinstance(ipc.handle.handle, bytes)
    ipc.close()
