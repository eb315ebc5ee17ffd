"""Named tensors into host buffers: packing and the copy list (pure), and the registry pinning
new buffers while the host copies run."""

import threading

import pytest
import torch
from safetensors.torch import save_file

from ckpt_engine import ParameterServer, PSConfig
from ckpt_engine.planner import ALIGN
from ckpt_engine.ps import named as named_mod
from ckpt_engine.ps import registry as registry_mod
from ckpt_engine.ps.named import NAMED_CHUNK_BYTES, pack, plan_copies
from ckpt_engine.ps.registry import Registry


def test_pack_aligns_fills_buffers_in_order_and_gives_a_large_tensor_its_own():
    big = NAMED_CHUNK_BYTES + 1
    chunks, where, offsets = pack([0, 10, 300, big, 5, NAMED_CHUNK_BYTES - 256, 7])
    # the zero-byte first tensor opens buffer 0; the large one goes alone (buffer 1) even
    # though buffer 0 is not empty; the one that does not fit after it opens buffer 2, etc.
    assert where == [0, 0, 0, 1, 2, 2, 3]
    assert offsets == [0, 0, ALIGN, 0, 0, ALIGN, 0]
    assert chunks == [ALIGN + 300, big, ALIGN + NAMED_CHUNK_BYTES - 256, 7]


def test_pack_puts_a_large_tensor_into_an_empty_buffer():
    chunks, where, offsets = pack([0, 0, NAMED_CHUNK_BYTES * 2])
    assert (chunks, where, offsets) == ([NAMED_CHUNK_BYTES * 2], [0, 0, 0], [0, 0, 0])


def test_plan_copies_merges_adjacent_views_and_leaves_strided_ones_to_torch():
    flat = torch.arange(4 * 64, dtype=torch.int32)  # 256-byte views, back to back
    tensors = [flat[i * 64 : (i + 1) * 64] for i in range(4)]
    tensors.insert(2, flat[::2])  # strided: torch's copy
    tensors.append(torch.empty(0))  # nothing to copy
    sizes = [t.nbytes for t in tensors]
    _, where, offsets = pack(sizes)
    jobs, by_torch = plan_copies(tensors, sizes, where, offsets, bases=[1 << 20])
    src = flat.data_ptr()
    # views 0-1 continue on both sides; the strided one breaks the destination's run
    assert jobs == [[1 << 20, src, 512], [(1 << 20) + 3 * 256 + ALIGN, src + 512, 512]]
    assert offsets[2] == 512 and by_torch == [2]


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A pinning registry on a CPU build: the CUDA device calls are no-ops."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    reg = Registry(
        host_memory_kind="anonymous",
        shm_dir=str(tmp_path),
        pin=True,
        pin_in_place=False,
        read_threads=2,
        label="t",
        pool_bytes=1 << 30,
    )
    yield reg
    reg.close()


def test_new_buffers_are_pinned_while_the_host_copies_run(registry, monkeypatch):
    """Each side waits for the other to have started: done one after the other, the first
    would time out. The read threads are split between them; a registration into the pool's
    pinned buffers copies on all of them."""
    pin_started, copy_started = threading.Event(), threading.Event()
    pinned, copy_threads = [], []

    def pin_all(buffers, threads):
        pin_started.set()
        assert copy_started.wait(10), "the copies did not run while pinning"
        assert threads == 1
        for buf in buffers:
            buf.pinned = True
        pinned.extend(buffers)

    real_copy = named_mod.copy_host

    def copy_host(jobs, *, threads, progress):
        copy_started.set()
        copy_threads.append(threads)
        if not pinned:
            assert pin_started.wait(10), "pinning did not run while copying"
        real_copy(jobs, threads=threads, progress=progress)

    monkeypatch.setattr(registry, "_pin_all", pin_all)
    monkeypatch.setattr("ckpt_engine.ps.registry.copy_host", copy_host)
    named = {f"t{i}": torch.full((100,), i, dtype=torch.int16) for i in range(50)}
    ckpt = registry.register("a", named_tensors=named)
    assert pinned == ckpt.buffers
    for name, tensor in named.items():
        assert torch.equal(ckpt.get_tensor(name), tensor)
    registry.unregister("a")
    again = registry.register("b", named_tensors=named)  # the pool's pinned buffer
    assert len(pinned) == 1 and copy_threads == [1, 2]
    assert torch.equal(again.get_tensor("t7"), named["t7"])
    registry.unregister("b")
    for buf in registry.pool.free_buffers():
        buf.pinned = False  # never pinned for real: nothing to unpin on close


def test_a_pinning_failure_fails_the_registration_after_the_copies_end(registry, monkeypatch):
    copies_done = threading.Event()
    real_copy = named_mod.copy_host

    def copy_host(jobs, **kwargs):
        real_copy(jobs, **kwargs)
        copies_done.set()

    def pin_all(buffers, threads):
        raise RuntimeError("cudaHostRegister: out of memory")

    monkeypatch.setattr(registry, "_pin_all", pin_all)
    monkeypatch.setattr("ckpt_engine.ps.registry.copy_host", copy_host)
    with pytest.raises(RuntimeError, match="cudaHostRegister"):
        registry.register("a", named_tensors={"x": torch.ones(1000)})
    assert copies_done.is_set() and "a" not in registry
    assert registry.pool.free_bytes > 0  # the buffer went back


def test_a_failed_copy_waits_for_pinning_then_raises(registry, monkeypatch):
    pinning_done = threading.Event()

    def pin_all(buffers, threads):
        assert not pinning_done.is_set()
        pinning_done.set()

    def copy_host(jobs, **kwargs):
        raise MemoryError("copy failed")

    monkeypatch.setattr(registry, "_pin_all", pin_all)
    monkeypatch.setattr("ckpt_engine.ps.registry.copy_host", copy_host)
    with pytest.raises(MemoryError):
        registry.register("a", named_tensors={"x": torch.ones(1000)})
    assert pinning_done.is_set() and "a" not in registry


def test_files_are_read_while_pinned_too(tmp_path, monkeypatch):
    """File registration (not staged) overlaps its reads with pinning the same way."""

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    tensors = {f"w{i}": torch.full((64,), i, dtype=torch.float32) for i in range(8)}
    path = tmp_path / "a.safetensors"
    save_file(tensors, str(path))
    started = threading.Event()
    real_read = registry_mod.read_parallel

    def read_parallel(jobs, **kwargs):
        started.set()
        real_read(jobs, **kwargs)

    def pin_all(buffers, threads):
        assert started.wait(10), "the reads did not run while pinning"

    reg = Registry(
        host_memory_kind="anonymous",
        shm_dir=str(tmp_path / "shm"),
        pin=True,
        pin_in_place=False,
        read_threads=2,
        label="t",
    )
    monkeypatch.setattr(reg, "_pin_all", pin_all)
    monkeypatch.setattr("ckpt_engine.ps.registry.read_parallel", read_parallel)
    try:
        ckpt = reg.register("f", files=[path])
        for name, tensor in tensors.items():
            assert torch.equal(ckpt.get_tensor(name), tensor)
    finally:
        reg.close()


def test_cpu_server_registers_without_pinning(tmp_path, monkeypatch):
    """On CPU nothing is pinned: no CUDA call is made at all."""
    monkeypatch.setenv("CKPT_ENGINE_SHM_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("CUDA called"))
    ps = ParameterServer(rank=0, world_size=1, device_type="cpu", config=PSConfig())
    try:
        ps.register_checkpoint("a", named_tensors={"x": torch.ones(10)})
    finally:
        ps.close()
