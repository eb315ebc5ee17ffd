"""Named tensors into host buffers: packing and the copy list (pure, checked against the
per-tensor loops they replace), the registry's order (pin, then copy) and its bytes."""

import random

import pytest
import torch
from registry_testutil import make_registry

from ckpt_engine import ParameterServer, PSConfig
from ckpt_engine.planner import ALIGN, align_up
from ckpt_engine.ps import hostcopy, named
from ckpt_engine.ps.named import NAMED_CHUNK_BYTES, pack, plan_copies


def pack_by_loop(sizes, limit):
    """The per-tensor loop ``pack`` replaced."""
    chunks, where, offsets = [], [], []
    for nbytes in sizes:
        offset = align_up(chunks[-1], ALIGN) if chunks else 0
        if not chunks or (offset + nbytes > limit and chunks[-1] > 0):
            chunks.append(0)
            offset = 0
        chunks[-1] = offset + nbytes
        where.append(len(chunks) - 1)
        offsets.append(offset)
    return chunks, where, offsets


@pytest.mark.parametrize("seed", range(20))
def test_pack_agrees_with_the_loop(monkeypatch, seed):
    rng = random.Random(seed)
    limit = 4096
    monkeypatch.setattr(named, "NAMED_CHUNK_BYTES", limit)
    choices = [0, 1, 255, 256, 257, 1000, limit - 256, limit, limit + 1, 3 * limit]
    sizes = [rng.choice(choices) for _ in range(rng.randint(0, 60))]
    assert pack(sizes) == pack_by_loop(sizes, limit)


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
    assert jobs.tolist() == [[1 << 20, src, 512], [(1 << 20) + 3 * 256 + ALIGN, src + 512, 512]]
    assert offsets[2] == 512 and by_torch == [2]


def plan_by_loop(tensors, sizes, where, offsets, bases, skip):
    """The per-tensor loop ``plan_copies`` replaced."""
    jobs, by_torch, last = [], [], [-1, -1, 0]
    for i, (tensor, nbytes, chunk, offset) in enumerate(zip(tensors, sizes, where, offsets)):
        if not nbytes or i in skip:
            continue
        if tensor.is_cpu and tensor.is_contiguous():
            dst, src = bases[chunk] + offset, tensor.data_ptr()
            if last[0] + last[2] == dst and last[1] + last[2] == src:
                last[2] += nbytes
            else:
                last = [dst, src, nbytes]
                jobs.append(last)
        else:
            by_torch.append(i)
    return jobs, by_torch


def mixed_tensors(seed: int, count: int = 400) -> dict[str, torch.Tensor]:
    """Separate tensors and views of flat buffers (some adjacent), strided and empty ones,
    of several dtypes."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randint(-100, 100, (count * 40,), dtype=torch.int16, generator=gen)
    out, at = {}, 0
    for i in range(count):
        kind = rng.choice(["alone", "view", "view", "strided", "empty", "bf16", "f32", "u8"])
        n = rng.randint(1, 40)
        if kind == "view":
            out[f"t{i}"], at = flat[at : at + n].view(1, n), at + n + rng.choice([0, 0, 1])
        elif kind == "strided":
            out[f"t{i}"] = torch.randn(n, 3, generator=gen).t()
        elif kind == "empty":
            out[f"t{i}"] = torch.empty(0, n)
        elif kind == "bf16":
            out[f"t{i}"] = torch.randn(n, generator=gen).to(torch.bfloat16)
        elif kind == "f32":
            out[f"t{i}"] = torch.randn(2, n, generator=gen)
        elif kind == "u8":
            out[f"t{i}"] = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        else:
            out[f"t{i}"] = torch.randint(-9, 9, (n, 2), dtype=torch.int64, generator=gen)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_plan_copies_agrees_with_the_loop(seed):
    tensors = list(mixed_tensors(seed).values())
    sizes = [t.nbytes for t in tensors]
    _, where, offsets = pack(sizes)
    skip = set(random.Random(seed).sample(range(len(tensors)), 20))
    jobs, by_torch = plan_copies(tensors, sizes, where, offsets, [1 << 30], skip=skip)
    assert (jobs.tolist(), by_torch) == plan_by_loop(
        tensors, sizes, where, offsets, [1 << 30], skip
    )


@pytest.mark.parametrize("method", ["writev", "readv", "memmove"])
def test_registered_bytes_are_exact(tmp_path, monkeypatch, method):
    if method != "memmove" and hostcopy.method == "memmove":
        pytest.skip("process_vm_writev/readv are not available here")
    monkeypatch.setattr(hostcopy, "method", method)
    monkeypatch.setattr(hostcopy, "BATCH_BYTES", 4096)  # many batches on both threads
    tensors = mixed_tensors(7, count=3000)
    reg = make_registry(tmp_path, pin=False)
    try:
        ckpt = reg.register("m", named_tensors=tensors)
        assert [m.name for m in ckpt.tensors] == list(tensors)
        for meta, tensor in zip(ckpt.tensors, tensors.values()):
            assert meta.shape == tuple(tensor.shape) and type(meta.shape) is tuple
            assert meta.nbytes == tensor.nbytes and meta.offset % ALIGN == 0
            raw = tensor.contiguous().reshape(-1).view(torch.uint8)
            assert torch.equal(ckpt.bytes_of(meta), raw), meta.name
    finally:
        reg.close()
    assert hostcopy.method == method


@pytest.mark.parametrize("method", ["writev", "readv", "memmove"])
def test_unpinned_buffers_are_populated_before_batched_copies(tmp_path, monkeypatch, method):
    """process_vm_writev faults missing pages in one at a time: the page tables are filled
    first (in parallel) when it copies; memmove's and readv's own faults are cheap."""
    if method != "memmove" and hostcopy.method == "memmove":
        pytest.skip("process_vm_writev/readv are not available here")
    monkeypatch.setattr(hostcopy, "method", method)
    calls = []
    monkeypatch.setattr(
        "ckpt_engine.host_memory.populate_all", lambda bufs, threads: calls.append(len(bufs))
    )
    reg = make_registry(tmp_path, pin=False)
    try:
        ckpt = reg.register("m", named_tensors={"x": torch.arange(10.0)})
        assert torch.equal(ckpt.get_tensor("x"), torch.arange(10.0))
    finally:
        reg.close()
    assert calls == ([1] if method == "writev" else [])


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A pinning registry (its ``_pin_all`` replaced by each test)."""
    reg = make_registry(tmp_path, pin=True, pool_bytes=1 << 30)
    yield reg
    reg.close()


@pytest.mark.parametrize("beside", [True, False])
def test_a_pinning_failure_fails_the_registration_before_any_copy(registry, monkeypatch, beside):
    """(writev: pinned before copying; readv copies first, the test after this one)"""
    monkeypatch.setattr(named, "PLAN_BESIDE_PIN", beside)
    monkeypatch.setattr(hostcopy, "method", "writev")

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


@pytest.mark.parametrize(
    ("method", "order"), [("writev", "pin copy"), ("readv", "copy pin"), ("auto", "copy pin")]
)
def test_readv_copies_into_new_buffers_before_pinning_them(registry, monkeypatch, method, order):
    """process_vm_readv faults the new buffers' pages in itself (huge pages, on the copy
    threads), so they are pinned after it; writev's buffers are pinned (populated) first."""
    monkeypatch.setattr(hostcopy, "method", method)
    calls = []
    monkeypatch.setattr(registry, "_pin_all", lambda bufs: calls.extend(["pin"] * bool(bufs)))
    monkeypatch.setattr(
        "ckpt_engine.ps.registry.copy_host", lambda jobs, **kwargs: calls.append("copy")
    )
    registry.register("a", named_tensors={"x": torch.ones(1000)})
    assert " ".join(calls) == order


def test_a_pinning_failure_after_readv_copies_fails_the_registration(registry, monkeypatch):
    monkeypatch.setattr(hostcopy, "method", "readv")

    def pin_all(buffers):
        if buffers:
            raise RuntimeError("cudaHostRegister: out of memory")

    monkeypatch.setattr(registry, "_pin_all", pin_all)
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
