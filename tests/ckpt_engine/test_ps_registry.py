"""Registering checkpoints on one rank (no collectives involved)."""

import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from ckpt_engine import CheckpointError, CheckpointFileError, ParameterServer, PSConfig, leases
from ckpt_engine.dtypes import SUPPORTED, to_torch
from ckpt_engine.host_memory import FILE_PREFIX


@pytest.fixture
def shm(tmp_path, monkeypatch):
    d = tmp_path / "shm"
    d.mkdir()
    monkeypatch.setenv("CKPT_ENGINE_SHM_DIR", str(d))
    return d


@pytest.fixture(params=["anonymous", "shm"])
def ps(shm, request):
    server = ParameterServer(
        rank=0, world_size=1, device_type="cpu", config=PSConfig(host_memory=request.param)
    )
    yield server
    server.close()


def ours(shm):
    """The run's buffer files in ``shm`` (not its lease lock file, which lives as long as the run)."""
    return sorted(
        n
        for n in os.listdir(shm)
        if n.startswith(FILE_PREFIX) and not n.endswith(leases.LOCK_SUFFIX)
    )


def tensors(prefix, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(SUPPORTED):
        dtype = to_torch(name)
        raw = torch.randint(0, 256, (6 * dtype.itemsize,), dtype=torch.uint8, generator=g)
        out[f"{prefix}.{name}"] = (
            torch.randint(0, 2, (2, 3), generator=g).bool()
            if dtype == torch.bool
            else raw.view(dtype).reshape(2, 3)
        )
        out[f"{prefix}.s{i}"] = torch.tensor(i, dtype=torch.int32)
    out[f"{prefix}.empty"] = torch.zeros(0, 3, dtype=torch.float16)
    return out


def same(a, b):
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and (
            a.numel() == 0
            or torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    )


def test_files_in_place_files_and_named_tensors(ps, shm, tmp_path):
    disk, mem, named = tensors("disk", 1), tensors("mem", 2), tensors("named", 3)
    save_file(disk, tmp_path / "disk.safetensors")
    save_file(mem, shm / "mem.safetensors")  # already in shared memory: mapped in place
    ps.register_checkpoint(
        "c",
        files=[tmp_path / "disk.safetensors", str(shm / "mem.safetensors")],
        named_tensors=named,
    )
    ckpt = ps.checkpoint("c")
    kind = ps.config.host_memory
    assert [b.kind for b in ckpt.buffers] == [kind, "in_place", kind]
    assert len(ours(shm)) == (2 if kind == "shm" else 0)
    for name, tensor in {**disk, **mem, **named}.items():
        assert same(ckpt.get_tensor(name), tensor), name
    metas = ps.local_metas("c")
    assert len(metas.tensors) == len(disk) + len(mem) + len(named)
    assert metas.device_key == ps.device_key
    ps.unregister_checkpoint("c")
    assert ours(shm) == [] and (shm / "mem.safetensors").exists()
    assert ps.registered_checkpoints() == []


def test_named_tensors_non_contiguous_and_views(ps):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    named = {
        "t": base.t(),
        "slice": base[1:3, ::2],
        "scalar": torch.tensor(7.5, dtype=torch.float64),
    }
    ps.register_checkpoint("n", named_tensors=named)
    for name, tensor in named.items():
        assert torch.equal(ps.checkpoint("n").get_tensor(name), tensor)


def test_many_named_tensors_copied_on_threads(shm):
    """Thousands of small tensors (MoE experts), contiguous ones copied by the read threads,
    mixed with strided ones and views at storage offsets, all bit-exact."""
    config = PSConfig(host_memory="anonymous", read_threads=4)
    ps = ParameterServer(rank=0, world_size=1, local_rank=0, config=config, device_type="cpu")
    base = torch.arange(3000 * 7, dtype=torch.int32)
    named = {f"e{i}": base[i * 7 : i * 7 + 7 - i % 3] for i in range(3000)}  # offsets vary
    named["strided"] = base[::5]
    flat = torch.arange(100 * 64, dtype=torch.int32)  # 256-byte views of one buffer: merged
    named.update({f"flat{i}": flat[i * 64 : (i + 1) * 64].view(8, 8) for i in range(100)})
    named["bf16"] = torch.randn(33, 5).to(torch.bfloat16)
    try:
        ps.register_checkpoint("many", named_tensors=named)
        ckpt = ps.checkpoint("many")
        for name, tensor in named.items():
            assert torch.equal(
                ckpt.get_tensor(name).view(torch.uint8), tensor.contiguous().view(torch.uint8)
            ), name
    finally:
        ps.close()


def corrupt(path):
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    path.write_bytes(bytes(data[: 8 + n + 4]))  # truncate the data section


def test_bad_file_fails_the_whole_registration(ps, shm, tmp_path):
    save_file(tensors("a"), tmp_path / "a.safetensors")
    save_file(tensors("b"), tmp_path / "b.safetensors")
    corrupt(tmp_path / "b.safetensors")
    with pytest.raises(CheckpointFileError, match=r"b\.safetensors: offsets out of range") as info:
        ps.register_checkpoint(
            "c",
            files=[tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
            named_tensors={"x": torch.ones(3)},
        )
    assert info.value.path.endswith("b.safetensors")
    assert ps.registered_checkpoints() == [] and ours(shm) == []
    ps.register_checkpoint("c", files=[tmp_path / "a.safetensors"])  # the name is free again


def test_same_tensor_in_two_sources(ps, shm, tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    with pytest.raises(
        CheckpointFileError,
        match=r"b.safetensors: the same tensor name twice: 'w' \(also in .*a.safetensors\)",
    ):
        ps.register_checkpoint("c", files=[tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    with pytest.raises(CheckpointFileError, match="also in named_tensors"):
        ps.register_checkpoint(
            "c", files=[tmp_path / "a.safetensors"], named_tensors={"w": torch.ones(1)}
        )
    assert ps.registered_checkpoints() == [] and ours(shm) == []


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"named_tensors": {"x": [1, 2]}}, "not a tensor"),
        ({"named_tensors": {"": torch.ones(1)}}, "non-empty string"),
        ({"named_tensors": {"c": torch.ones(1, dtype=torch.complex128)}}, "cannot be stored"),
        ({"files": "one.safetensors"}, "list of paths"),
    ],
)
def test_bad_arguments(ps, kwargs, problem):
    with pytest.raises(CheckpointError, match=problem):
        ps.register_checkpoint("c", **kwargs)


def test_names_are_unique_and_known(ps):
    ps.register_checkpoint("c", named_tensors={"x": torch.ones(1)})
    with pytest.raises(CheckpointError, match="already registered"):
        ps.register_checkpoint("c", named_tensors={"x": torch.ones(1)})
    with pytest.raises(CheckpointError, match="'d' is not registered; registered: \\['c'\\]"):
        ps.unregister_checkpoint("d")


def test_empty_checkpoint_is_allowed(ps):
    ps.register_checkpoint("nothing")
    assert ps.local_metas("nothing").tensors == ()
