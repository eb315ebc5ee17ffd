"""The host pool across registrations (issue 18): reuse without new mapping or pinning, the
bound, release on close, bytes right after reuse. cudaHostRegister is replaced by a recorder so
that the pinning bookkeeping runs on CPU."""

import time

import pytest
import torch
from registry_testutil import make_registry
from safetensors.torch import save_file

from ckpt_engine import PSConfig, host_memory
from ckpt_engine.pool import HostPool


@pytest.fixture
def pins(monkeypatch):
    """Record cudaHostRegister / cudaHostUnregister calls by address."""
    calls = {"pin": [], "unpin": []}
    monkeypatch.setattr(host_memory, "_cuda_pin", lambda t: calls["pin"].append(t.data_ptr()))
    monkeypatch.setattr(host_memory, "_cuda_unpin", lambda t: calls["unpin"].append(t.data_ptr()))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    return calls


def registry(tmp_path, pool_bytes, *, pin=True):
    return make_registry(
        tmp_path / "shm", pin=pin, pool_bytes=pool_bytes, pin_in_place=True, read_threads=4
    )


def write(tmp_path, step, sizes=(3000, 5000, 700)):
    """One file per size, float32 tensors whose bytes depend on ``step``."""
    g = torch.Generator().manual_seed(step)
    files, expected = [], {}
    for i, n in enumerate(sizes):
        tensors = {f"f{i}.a": torch.randn(n, generator=g), f"f{i}.b": torch.randn(7, generator=g)}
        path = tmp_path / f"model-{i}.safetensors"
        save_file(tensors, path)
        files.append(str(path))
        expected.update(tensors)
    return files, expected


def bases(ckpt):
    return sorted(b.base.tensor.data_ptr() for b in ckpt.buffers)


def check(ckpt, expected):
    for name, tensor in expected.items():
        assert torch.equal(ckpt.get_tensor(name), tensor), name


def test_same_shapes_reuse_buffers_without_new_pinning(tmp_path, pins):
    reg = registry(tmp_path, 1 << 30)
    files, first = write(tmp_path, 0)
    ckpt = reg.register("step0", files=files, named_tensors={"lr": torch.tensor([0.5])})
    check(ckpt, first)
    assert all(b.pinned for b in ckpt.buffers) and len(pins["pin"]) == 4
    before = bases(ckpt)
    reg.unregister("step0")
    assert pins["unpin"] == [] and len(reg.pool.free_buffers()) == 4
    files, second = write(tmp_path, 1)  # new bytes, same shapes
    ckpt = reg.register("step1", files=files, named_tensors={"lr": torch.tensor([0.25])})
    assert bases(ckpt) == before and reg.pool.reused == 4 and reg.pool.allocated == 4
    assert len(pins["pin"]) == 4, "no cudaHostRegister for reused buffers"
    check(ckpt, second)
    assert torch.equal(ckpt.get_tensor("lr"), torch.tensor([0.25]))
    reg.close()
    assert sorted(pins["unpin"]) == sorted(pins["pin"]) and reg.pool.free_buffers() == []


def test_smaller_checkpoint_reuses_best_fit_and_larger_allocates(tmp_path, pins):
    reg = registry(tmp_path, 1 << 30)
    files, _ = write(tmp_path, 0, sizes=(1000, 4000))
    ckpt = reg.register("a", files=files)
    by_size = {b.nbytes: b.base.tensor.data_ptr() for b in ckpt.buffers}
    reg.unregister("a")
    files, expected = write(tmp_path, 1, sizes=(900,))  # fits both: the smaller one is taken
    ckpt = reg.register("b", files=files)
    small = min(by_size)
    assert [b.base.tensor.data_ptr() for b in ckpt.buffers] == [by_size[small]]
    assert ckpt.buffers[0].nbytes < small, "the lease is the file's size, not the buffer's"
    check(ckpt, expected)
    files, expected = write(tmp_path, 2, sizes=(3000, 8000))  # 8000 fits nothing: new
    ckpt2 = reg.register("c", files=files)
    assert reg.pool.allocated == 3 and reg.pool.free_buffers() == []
    check(ckpt2, expected)
    reg.close()
    assert sorted(pins["unpin"]) == sorted(pins["pin"])


def test_over_the_bound_buffers_are_freed_not_pooled(tmp_path, pins):
    files, _ = write(tmp_path, 0, sizes=(1000, 4000))
    small = 1000 * 4 + 7 * 4
    reg = registry(tmp_path, small + 100)  # room for the small file's buffer only
    ckpt = reg.register("a", files=files)
    leased = {b.nbytes: b.base for b in ckpt.buffers}
    big = leased[max(leased)]
    big_address = big.tensor.data_ptr()
    reg.unregister("a")
    free = reg.pool.free_buffers()
    assert [b.nbytes for b in free] == [small] and reg.pool.free_bytes <= small + 100
    assert big.closed and pins["unpin"] == [big_address], "freed (and unpinned) at once"
    reg.close()
    assert leased[small].closed and sorted(pins["unpin"]) == sorted(pins["pin"])


def test_pool_off_frees_on_unregister(tmp_path, pins):
    reg = registry(tmp_path, 0)
    files, _ = write(tmp_path, 0)
    ckpt = reg.register("a", files=files)
    buffers = list(ckpt.buffers)
    reg.unregister("a")
    assert all(b.closed for b in buffers) and len(pins["unpin"]) == 3
    assert reg.pool.free_buffers() == [] and reg.pool.allocated == 0


def test_failed_registration_returns_buffers_to_the_pool(tmp_path, pins):
    reg = registry(tmp_path, 1 << 30)
    files, _ = write(tmp_path, 0)
    with open(files[1], "r+b") as f:  # cut the second file's data short
        f.truncate(f.seek(0, 2) - 100)
    with pytest.raises(Exception, match="model-1"):
        reg.register("bad", files=files)
    assert reg.names() == []
    assert len(reg.pool.free_buffers()) <= 3 and reg.pool.free_bytes <= 1 << 30
    files, expected = write(tmp_path, 1)
    check(reg.register("good", files=files), expected)
    reg.close()
    assert sorted(pins["unpin"]) == sorted(pins["pin"])


def test_cpu_registry_reuses_and_bytes_stay_right(tmp_path):
    reg = registry(tmp_path, 1 << 30, pin=False)
    for step in range(3):
        files, expected = write(tmp_path, step)
        named = {"w": torch.full((3, 5), float(step))}
        ckpt = reg.register(f"s{step}", files=files, named_tensors=named)
        check(ckpt, {**expected, **named})
        reg.unregister(f"s{step}")
    assert reg.pool.allocated == 4 and reg.pool.reused == 8
    reg.close()
    assert reg.pool.free_buffers() == []


def test_closed_pool_frees_late_leases():
    pool = HostPool(kind="anonymous", shm_dir="/dev/shm", max_bytes=1 << 20)
    lease = pool.take(4096, label="t")
    pool.close()
    lease.close()
    assert lease.base.closed and pool.free_buffers() == []


def test_held_bytes_and_trim(tmp_path, pins):
    """What the watching updater reports and does after a push: the pool's bytes stay those of
    the first checkpoint of a size; ``trim`` frees the buffers nothing registered uses."""
    reg = registry(tmp_path, 1 << 30)
    files, _ = write(tmp_path, 0)
    reg.register("a", files=files)
    held = reg.pool.held_bytes
    assert held == reg.pool.allocated_bytes >= 8700 * 4
    for step in (1, 2):
        reg.unregister("a")
        files, expected = write(tmp_path, step)
        check(reg.register("a", files=files), expected)
        assert reg.pool.trim() == 0 and reg.pool.held_bytes == held
    reg.unregister("a")
    files, _ = write(tmp_path, 3, sizes=(3000,))  # smaller: two buffers unused
    reg.register("a", files=files)
    assert reg.pool.trim() == held - 3000 * 4 - 7 * 4
    assert reg.pool.held_bytes == 3000 * 4 + 7 * 4 and len(pins["unpin"]) == 2
    reg.close()
    assert reg.pool.held_bytes == 0


def test_shm_buffers_are_not_pooled(tmp_path):
    pool = HostPool(kind="shm", shm_dir=str(tmp_path), max_bytes=1 << 20)
    buf = pool.take(4096, label="t")
    assert not hasattr(buf, "base")
    buf.close()
    assert list(tmp_path.iterdir()) == []


def test_config_and_environment(monkeypatch):
    monkeypatch.setenv("CKPT_ENGINE_HOST_POOL_BYTES", "0")
    assert PSConfig().host_pool_bytes == 0
    assert PSConfig(host_pool_bytes=5).host_pool_bytes == 5
    monkeypatch.setenv("CKPT_ENGINE_HOST_POOL_BYTES", "lots")
    with pytest.raises(ValueError, match="CKPT_ENGINE_HOST_POOL_BYTES"):
        PSConfig()
    with pytest.raises(ValueError, match="host_pool_bytes"):
        PSConfig(host_pool_bytes=-1)


def test_deferred_reads_land_in_reused_pinned_buffers(tmp_path, pins):
    """register_and_update's registration (reads in the background) on pooled buffers."""
    reg = registry(tmp_path, 1 << 30)
    for step in range(3):
        files, expected = write(tmp_path, step)
        ckpt = reg.register(f"s{step}", files=files, defer_reads=True)
        ckpt.reads.wait_all(time.monotonic() + 30)
        assert ckpt.reads.complete
        check(ckpt, expected)
        reg.unregister(f"s{step}")
    assert len(pins["pin"]) == 3 and reg.pool.allocated == 3 and reg.pool.reused == 6
    reg.close()
    assert sorted(pins["unpin"]) == sorted(pins["pin"])
