"""Named tensors into host buffers: packing and the copy list (pure), and the registry's order
(pin, then copy)."""

import pytest
import torch

from ckpt_engine import ParameterServer, PSConfig
from ckpt_engine.planner import ALIGN
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
    """A pinning registry (its ``_pin_all`` replaced by each test)."""
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


def test_a_pinning_failure_fails_the_registration_before_any_copy(registry, monkeypatch):
    def pin_all(buffers):
        if buffers:  # (the registration's files part pins no buffer)
            raise RuntimeError("cudaHostRegister: out of memory")

    def copy_host(jobs, **kwargs):
        pytest.fail("copied into buffers that could not be pinned")

    monkeypatch.setattr(registry, "_pin_all", pin_all)
    monkeypatch.setattr("ckpt_engine.ps.registry.copy_host", copy_host)
    with pytest.raises(RuntimeError, match="cudaHostRegister"):
        registry.register("a", named_tensors={"x": torch.ones(1000)})
    assert "a" not in registry
    assert registry.pool.free_bytes > 0  # the buffer went back


def test_cpu_server_registers_without_pinning(tmp_path, monkeypatch):
    """On CPU nothing is pinned: no CUDA call is made at all."""
    monkeypatch.setenv("CKPT_ENGINE_SHM_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("CUDA called"))
    ps = ParameterServer(rank=0, world_size=1, device_type="cpu", config=PSConfig())
    try:
        ps.register_checkpoint("a", named_tensors={"x": torch.ones(10)})
    finally:
        ps.close()
