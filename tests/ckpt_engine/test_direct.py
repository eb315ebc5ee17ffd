"""register_and_update with named tensors on the rank's own device (ckpt_engine.ps.direct): the
update fills the slots straight from them while their host copy runs beside it.

On CPU the same path runs with host tensors (a CPU parameter server's device): memcpy into the
shared-memory slot from the tensors, the host copy on a thread. Checked per step: the worker's
bytes and the pool's host copy both equal the tensors' bytes as they were when the call was
made (GPU: their producing kernels still queued behind a spin kernel then; the trainer changes
them again right after the call returns), the tensors no longer referenced
once the call returns (their storages' use counts as before), strided and other-device tensors
on the old path; after a worker's refusal and after a bad tensor: the name unregistered, the
buffers back in the pool, the worker on its last good weights, no reference kept, and (CPU) the
host copy waited for before any buffer went back. The worker is a spawned process (CUDA IPC
needs one); world size 1."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import threading

import pytest
import torch

from ckpt_engine import CheckpointError, ParameterServer, PSConfig, UpdateError
from ckpt_engine.ps import direct as direct_mod
from ckpt_engine.ps import gather as gather_mod
from ckpt_engine.ps import named as named_mod


def digest(t: torch.Tensor) -> list:
    flat = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return [str(t.dtype), list(t.shape), hashlib.sha256(flat.numpy()).hexdigest()]


def worker(conn, index: int) -> None:
    """Per message (address, refuse): apply the update (or refuse its manifest); answer the
    digests of the weights committed last (its post-hook ran) and the error, if any."""
    import zmq

    from ckpt_engine import update_weights_from_ipc

    ctx = zmq.Context()
    committed: dict = {}
    while conn.poll(120):
        msg = conn.recv()
        if msg is None:
            break
        address, refuse = msg
        staged: dict = {}

        def validate(manifest, refuse=refuse):
            if refuse:
                raise ValueError("manifest refused by the test")

        def commit(staged=staged):
            committed.clear()
            committed.update(staged)

        try:
            update_weights_from_ipc(
                ctx,
                address,
                index,
                run=lambda ws, staged=staged: staged.update((n, digest(t)) for n, t in ws),
                post_hook=commit,
                validate=validate,
            )
            conn.send({"committed": dict(committed), "error": None})
        except Exception as e:
            conn.send({"committed": dict(committed), "error": f"{type(e).__name__}: {e}"})
    ctx.term()


def trainer_weights(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(64 + 4096, generator=g).to(device)
    mat = torch.randn(96, 64, generator=g).to(device)
    big = 8 << 20 if device == "cuda" else 1 << 18  # kernels still running when the step starts
    weights = {
        # views of one flat storage, back to back (a trainer's flat buffer): merged copies
        "flat.a": flat[64:1088].view(32, 32),
        "flat.b": flat[1088:2112],
        "flat.c": flat[2112:4160].view(2, 1024),
        "big": torch.randn(big, generator=g).to(device=device, dtype=torch.bfloat16),
        "odd": torch.randn(77, generator=g).to(device=device, dtype=torch.float16),
        "ints": torch.randint(-100, 100, (1000,), generator=g, dtype=torch.int8).to(device),
        "mask": (torch.rand(33, generator=g) > 0.5).to(device),
        "scalar": torch.tensor(3.5, dtype=torch.float64, device=device),
        "empty": torch.empty(0, 4, device=device),
        "w_t": mat.t(),  # strided: the old path (made contiguous, copied by torch)
        "w_rows": mat[::3],  # strided
    }
    if device == "cuda":  # not on the server's device: the old path
        weights["host_side"] = torch.randn(500, generator=g)
        if torch.cuda.device_count() > 1:
            weights["other_gpu"] = torch.randn(300, generator=g).to("cuda:1")
    return weights


def train_step(weights: dict[str, torch.Tensor]) -> None:
    """New values in place, as an optimizer step (on each device's current stream)."""
    with torch.no_grad():
        for name, t in weights.items():
            if t.dtype == torch.bool:
                t.logical_not_()
            elif name == "big":
                for _ in range(4):
                    t.mul_(1.0001).add_(0.5)
            elif name != "w_rows":  # a view of w_t's storage: changed with it
                t.add_(1)


def queue_step(weights: dict[str, torch.Tensor], device: str) -> None:
    """The trainer's step still queued when register_and_update starts (GPU: behind a spin
    kernel of tens of ms on the current stream), so the call must order its copies after it."""
    if device == "cuda":
        torch.cuda._sleep(100_000_000)
    train_step(weights)


def use_counts(weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """How many holders each tensor's storage has (ours included)."""
    return {n: torch._C._storage_Use_Count(t.untyped_storage()._cdata) for n, t in weights.items()}


class Spy:
    """Counts of the old path's torch copies and of the direct fills; on demand (CPU), a host
    copy that blocks until the registration is being closed, and the order of events."""

    def __init__(self, monkeypatch, ps) -> None:
        self.torch_copies = 0
        self.fills = 0
        self.block = False
        self.events: list[str] = []
        real_copy_into, real_fill = named_mod.copy_into, direct_mod.DirectSources.fill
        real_copy_host, real_close = direct_mod.copy_host, direct_mod.DirectSources.close
        real_give_back = ps.host_pool.give_back
        self.blocked, self.release = threading.Event(), threading.Event()

        def copy_into(dst, t):
            self.torch_copies += 1
            return real_copy_into(dst, t)

        def fill(sources, *args):
            self.fills += 1
            return real_fill(sources, *args)

        def copy_host(jobs, **kw):
            if self.block:
                self.blocked.set()
                assert self.release.wait(60), "never released"
            real_copy_host(jobs, **kw)
            self.events.append("host copy done")

        def close(sources):
            """While the host copy is held back: close must still be waiting after 0.5 s
            (it cannot finish before the copy is released; a close that does not wait returns
            at once), then the copy is released."""
            self.events.append("close")
            if self.blocked.is_set() and not self.release.is_set():
                closing = threading.Thread(target=real_close, args=(sources,))
                closing.start()
                closing.join(0.5)
                if closing.is_alive():
                    self.events.append("close waits for the host copy")
                self.release.set()
                closing.join(60)
            else:
                real_close(sources)

        def give_back(base):
            self.events.append("given back")
            real_give_back(base)

        monkeypatch.setattr(named_mod, "copy_into", copy_into)
        monkeypatch.setattr(direct_mod.DirectSources, "fill", fill)
        monkeypatch.setattr(direct_mod, "copy_host", copy_host)
        monkeypatch.setattr(direct_mod.DirectSources, "close", close)
        monkeypatch.setattr(ps.host_pool, "give_back", give_back)


@pytest.fixture
def env(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("CKPT_ENGINE_SHM_DIR", str(shm))
    monkeypatch.delenv("MASTER_PORT", raising=False)


class Inference:
    """The spawned worker, driven through the parameter server's ``req_func``; ``refuse``: its
    next update refuses the manifest."""

    def __init__(self):
        ctx = mp.get_context("spawn")
        self.here, there = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(there, 0), daemon=True)
        self.proc.start()
        self.refuse = False

    def req_func(self, paths):
        self.here.send((paths[0][1], self.refuse))

    def answer(self) -> dict:
        assert self.here.poll(60), "the worker did not answer"
        return self.here.recv()

    def close(self):
        self.here.send(None)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


@pytest.fixture
def served(device, env):
    """(the worker, a parameter server on ``device``), world size 1, small buckets."""
    inference = Inference()
    config = PSConfig(timeout_s=60.0, connect_poll_s=0.1, bucket_bytes=64 << 10)
    ps = ParameterServer(rank=0, world_size=1, device_type=device, config=config)
    yield inference, ps
    inference.close()
    ps.close()


@pytest.mark.parametrize(
    "device",
    [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)],
)
def test_slots_filled_from_the_tensors_host_copy_complete_failures_clean(
    device, served, monkeypatch
):
    inference, ps = served
    spy = Spy(monkeypatch, ps)
    weights = trainer_weights(device)
    holders = use_counts(weights)
    good = None
    for step in range(3):  # steps: every byte through the slots and into the host copy
        queue_step(weights, device)
        if step:
            ps.unregister_checkpoint(f"step{step - 1}")
        ps.register_and_update(f"step{step}", inference.req_func, named_tensors=weights)
        want = {n: digest(t) for n, t in weights.items()}  # the values it was called with
        train_step(weights)  # the trainer goes on once it returned: the step keeps its own
        reply = inference.answer()
        assert reply["error"] is None and reply["committed"] == want, reply["error"]
        ckpt = ps.checkpoint(f"step{step}")
        assert {n: digest(ckpt.get_tensor(n)) for n in weights} == want  # the host copy
        assert not ckpt.pending and "host_copy" in ps.last_step_timings
        assert use_counts(weights) == holders, "a reference to the tensors was kept"
        good = want
    by_torch = {"w_t", "w_rows", "other_gpu"} & set(weights)  # strided, another GPU
    assert spy.torch_copies == len(by_torch) * 3  # each step; the others read in place
    assert spy.fills >= 3

    # the worker refuses: name unregistered, buffers back, last good weights kept
    ps.unregister_checkpoint("step2")
    free = ps.host_pool.free_bytes
    train_step(weights)
    inference.refuse, spy.block, spy.events[:] = True, device == "cpu", []
    with pytest.raises(UpdateError, match="manifest refused by the test"):
        ps.register_and_update("refused", inference.req_func, named_tensors=weights)
    inference.refuse, spy.block = False, False
    reply = inference.answer()
    assert reply["committed"] == good and "refused" in reply["error"]
    assert ps.registered_checkpoints() == []
    assert ps.host_pool.free_bytes == free
    assert use_counts(weights) == holders
    if device == "cpu":  # the host copy ended before a buffer went back to the pool
        events = spy.events
        assert "close waits for the host copy" in events, events
        assert events.index("host copy done") < events.index("given back"), events

    # a tensor without data among them: refused naming it, nothing kept
    bad = {**weights, "layers.0.w": torch.empty(4, device="meta")}
    with pytest.raises(CheckpointError, match=r"named_tensors\['layers.0.w'\].*meta"):
        ps.register_and_update("bad", inference.req_func, named_tensors=bad)
    del bad
    assert ps.registered_checkpoints() == []
    assert ps.host_pool.free_bytes == free
    assert use_counts(weights) == holders

    # a strided copy failing after the direct host copy started: waited for, then given back
    spy.events[:] = []
    real = named_mod.copy_into

    def failing(dst, t):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(named_mod, "copy_into", failing)
    with pytest.raises(CheckpointError, match=r"named_tensors\['w_t'\].*illegal memory"):
        ps.register_and_update("copy_fails", inference.req_func, named_tensors=weights)
    monkeypatch.setattr(named_mod, "copy_into", real)
    events = spy.events
    assert events.index("close") < events.index("given back"), events
    assert ps.registered_checkpoints() == [] and ps.host_pool.free_bytes == free
    assert use_counts(weights) == holders

    # and the next step is whole again
    queue_step(weights, device)
    ps.register_and_update("final", inference.req_func, named_tensors=weights)
    want = {n: digest(t) for n, t in weights.items()}
    reply = inference.answer()
    assert reply["error"] is None and reply["committed"] == want
    assert {n: digest(ps.checkpoint("final").get_tensor(n)) for n in weights} == want


def test_decision_per_tensor():
    """On the server's device, contiguous, with bytes: direct; anything else: the old path."""
    cpu = torch.device("cpu")
    t = torch.ones(4, 4)
    assert direct_mod.is_direct(t, cpu) and direct_mod.is_direct(t[1:], cpu)
    assert not direct_mod.is_direct(t.t(), cpu)  # strided
    assert not direct_mod.is_direct(torch.empty(0), cpu)  # no bytes
    assert not direct_mod.is_direct(t, None)  # registration not deferred
    assert not direct_mod.is_direct(t, torch.device("cuda", 0))  # host tensor, GPU server


@pytest.mark.parametrize(
    "device",
    [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)],
)
def test_runs_of_small_tensors_come_from_the_host_copy(device, served, monkeypatch):
    """64 expert-sized tensors (2000 bytes) in runs of about 32 a bucket: each run is copied
    whole from the host buffer once its host copy landed (``sources.from_host``), the large
    tensor beside them from its own memory; bytes exact on both sides. (CPU) a host copy that
    fails fails the update naming it, and the worker keeps its last good weights."""
    inference, ps = served
    g = torch.Generator().manual_seed(1)
    weights = {f"experts.{i}": torch.randn(500, generator=g).to(device) for i in range(64)}
    weights["big"] = torch.randn(1 << 16, generator=g).to(device)
    holders = use_counts(weights)
    decisions: list[bool] = []
    real_from_host = direct_mod.from_host
    monkeypatch.setattr(
        direct_mod, "from_host", lambda p: decisions.append(real_from_host(p)) or decisions[-1]
    )

    for step in range(2):
        queue_step(weights, device)
        if step:
            ps.unregister_checkpoint(f"step{step - 1}")
        ps.register_and_update(f"step{step}", inference.req_func, named_tensors=weights)
        want = {n: digest(t) for n, t in weights.items()}  # the values it was called with
        train_step(weights)  # the trainer goes on once it returned
        reply = inference.answer()
        assert reply["error"] is None and reply["committed"] == want, reply["error"]
        ckpt = ps.checkpoint(f"step{step}")
        assert {n: digest(ckpt.get_tensor(n)) for n in weights} == want
        assert use_counts(weights) == holders
    assert decisions.count(True) >= 2 * 2, decisions  # the experts' runs, every step
    assert False in decisions, decisions  # the large tensor, from its own memory

    if device == "cpu":
        ps.unregister_checkpoint("step1")
        train_step(weights)

        def broken(jobs, **kw):
            raise RuntimeError("injected host copy failure")

        monkeypatch.setattr(direct_mod, "copy_host", broken)
        with pytest.raises(UpdateError, match="host copy failed: injected host copy failure"):
            ps.register_and_update("broken", inference.req_func, named_tensors=weights)
        reply = inference.answer()
        assert reply["committed"] == want and reply["error"] is not None
        assert ps.registered_checkpoints() == []
        assert use_counts(weights) == holders


@pytest.mark.parametrize(
    "device",
    [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)],
)
def test_past_max_tensors_every_tensor_takes_the_host_path(device, served, monkeypatch):
    """More direct-eligible tensors than ``MAX_TENSORS`` in one registration (10^5 MoE experts):
    none is read in place (the per-tensor calls would cost more than the overlap); the step is
    the host path's, bytes exact on both sides (GPU: packed on the device, then copied to host
    in a few copies, ckpt_engine.ps.gather; the step still queued at the call). At the limit,
    they are read in place."""
    inference, ps = served
    g = torch.Generator().manual_seed(2)
    weights = {f"experts.{i}": torch.randn(300, generator=g).to(device) for i in range(40)}
    made: list[int] = []
    real_init = direct_mod.DirectSources.__init__
    packs: list[int] = []
    real_pack = gather_mod.pack

    def init(self, named, indices, **kw):
        made.append(len(indices))
        real_init(self, named, indices, **kw)

    def pack(segment, *args):
        packs.append(len(segment.indices))
        return real_pack(segment, *args)

    monkeypatch.setattr(direct_mod.DirectSources, "__init__", init)
    monkeypatch.setattr(gather_mod, "pack", pack)
    monkeypatch.setattr(gather_mod, "STAGING_BYTES", 4096)  # 3 tensors a segment

    for step, limit in enumerate((39, 40)):
        monkeypatch.setattr(direct_mod, "MAX_TENSORS", limit)
        if step:
            ps.unregister_checkpoint(f"step{step - 1}")
        queue_step(weights, device)  # GPU: still queued behind a spin kernel at the call
        ps.register_and_update(f"step{step}", inference.req_func, named_tensors=weights)
        want = {n: digest(t) for n, t in weights.items()}
        reply = inference.answer()
        assert reply["error"] is None and reply["committed"] == want, reply["error"]
        ckpt = ps.checkpoint(f"step{step}")
        assert {n: digest(ckpt.get_tensor(n)) for n in weights} == want
    assert made == [40]  # only the step within the limit read them in place
    # the host path's step (GPU): 13 segments of 3 packed, the 40th tensor copied alone
    assert packs == ([3] * 13 if device == "cuda" else [])
