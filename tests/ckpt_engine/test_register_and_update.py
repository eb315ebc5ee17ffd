"""register_and_update: a training step's files to the workers in one pass (reads overlapped
with the update), bit-exact; a file truncated before or during the pass fails it naming the
file and leaves the last good checkpoint registered. World size 1, the worker on a thread."""

import threading

import pytest
import torch
import zmq
from safetensors.torch import load_file, save_file

from ckpt_engine import (
    CheckpointFileError,
    ParameterServer,
    PSConfig,
    UpdateError,
    update_weights_from_ipc,
)
from ckpt_engine.ps import staging


@pytest.fixture
def ps(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("CKPT_ENGINE_SHM_DIR", str(shm))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    # small read chunks and buckets: many chunks per file, buckets waiting on reads
    monkeypatch.setattr(staging, "READ_CHUNK_BYTES", 4096)
    server = ParameterServer(
        rank=0,
        world_size=1,
        device_type="cpu",
        config=PSConfig(
            bucket_bytes=32768,
            step_bucket_bytes=8192,
            timeout_s=10.0,
            connect_poll_s=0.1,
            read_threads=4,
        ),
    )
    yield server
    server.close()


class Inference:
    """Stands in for an inference server: keeps what it applied after its post hook only."""

    def __init__(self):
        self.weights, self.updates, self.error = {}, 0, None

    def req_func(self, socket_paths):
        ((_, address),) = socket_paths
        staged, self.error = {}, None

        def serve():
            ctx = zmq.Context()
            try:
                update_weights_from_ipc(
                    ctx,
                    address,
                    0,
                    run=lambda weights: staged.update((n, t.clone()) for n, t in weights),
                    post_hook=lambda: self._commit(staged),
                )
            except Exception as e:
                self.error = e
            finally:
                ctx.term()

        t = threading.Thread(target=serve)
        t.start()
        t.join(30)
        if self.error is not None:
            raise RuntimeError(f"inference server: {self.error}")

    def _commit(self, staged):
        self.weights = dict(staged)
        self.updates += 1


def write_step(tmp_path, step):
    """Three files (the trainer's output of one step), new bytes every step."""
    g = torch.Generator().manual_seed(step)
    files = []
    for i, n in enumerate((30_000, 5_000, 17)):
        tensors = {
            f"layer{i}.w": torch.randn(n, generator=g),
            f"layer{i}.b": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        }
        path = tmp_path / f"model-{i}.safetensors"
        save_file(tensors, path)
        files.append(path)
    return files


def expected(files):
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def assert_same(got, want):
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_steps_are_bit_exact_and_reuse_the_pool(ps, tmp_path):
    inference = Inference()
    for step in range(4):
        files = write_step(tmp_path, step)
        want = expected(files)
        ps.register_and_update(f"step{step}", inference.req_func, files=files)
        assert inference.updates == step + 1
        assert_same(inference.weights, want)
        ckpt = ps.checkpoint(f"step{step}")
        assert ckpt.reads is None, "the host copy is complete when it returns"
        assert_same({n: ckpt.get_tensor(n) for n in want}, want)
        if step:
            ps.unregister_checkpoint(f"step{step - 1}")
    pool = ps._registry.pool
    assert pool.allocated == 6 and pool.reused == 6, "two steps' buffers, then only reuse"
    ps.update("step3", Inference().req_func)  # a plain update of it still works


def test_a_step_moves_buckets_of_step_bucket_bytes(ps, tmp_path):
    path = tmp_path / "small.safetensors"  # 64 tensors of 1 KiB
    save_file({f"t{i}": torch.full((256,), float(i)) for i in range(64)}, path)
    inference = Inference()
    ps.register_and_update("step", inference.req_func, files=[path])
    assert ps.last_update_timings["buckets_n"] == 8  # 64 KiB in buckets of 8 KiB
    assert_same(inference.weights, expected([path]))
    ps.update("step", Inference().req_func)
    assert ps.last_update_timings["buckets_n"] == 2  # a plain update: of 32 KiB
    with pytest.raises(ValueError, match="step_bucket_bytes must be >= 4096"):
        PSConfig(step_bucket_bytes=1024)


def _fails_keeping_the_last_good(ps, inference, tmp_path, name, match):
    good = expected(write_step(tmp_path, 0))
    with pytest.raises((UpdateError, CheckpointFileError), match=match):
        ps.register_and_update(name, inference.req_func, files=write_step(tmp_path, 1))
    assert ps.registered_checkpoints() == ["good"]
    assert inference.updates == 1
    assert_same(inference.weights, good)
    again = Inference()
    ps.update("good", again.req_func)  # the last good checkpoint is intact
    assert_same(again.weights, good)


def test_file_truncated_before_the_step(ps, tmp_path):
    inference = Inference()
    ps.register_and_update("good", inference.req_func, files=write_step(tmp_path, 0))
    files = write_step(tmp_path, 1)
    with open(files[0], "r+b") as f:
        f.truncate(f.seek(0, 2) - 1000)
    with pytest.raises(CheckpointFileError, match=r"model-0\.safetensors"):
        ps.register_and_update("bad", inference.req_func, files=files)
    assert ps.registered_checkpoints() == ["good"] and inference.updates == 1


def test_file_truncated_during_the_reads(ps, tmp_path, monkeypatch):
    """The trainer cuts a file short after its header was read: the update fails naming it."""
    inference = Inference()
    ps.register_and_update("good", inference.req_func, files=write_step(tmp_path, 0))
    real = staging._pread_exact
    cut = threading.Event()

    def truncating(fd, path, buf, offset):
        if path.endswith("model-0.safetensors") and not cut.is_set():
            cut.set()
            with open(path, "r+b") as f:
                f.truncate(offset + 100)
        return real(fd, path, buf, offset)

    monkeypatch.setattr(staging, "_pread_exact", truncating)
    _fails_keeping_the_last_good(ps, inference, tmp_path, "bad", r"model-0\.safetensors")
    assert cut.is_set()
    monkeypatch.setattr(staging, "_pread_exact", real)
    files = write_step(tmp_path, 2)  # the next step goes through
    ps.register_and_update("next", inference.req_func, files=files)
    assert_same(inference.weights, expected(files))
