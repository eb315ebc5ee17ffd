"""The upstream checkpoint-engine 0.4.x wire on CPU: our codec against a hand-written transcript
(tests/ckpt_engine/upstream_transcript.py), our ParameterServer against a worker that plays
upstream's part from the transcript, and our worker against a parameter server that does.

What differs from the GPU path (tests/ckpt_engine/test_compat_upstream_gpu.py, which runs
upstream's own code): the first message carries our shared-memory stand-in handle
(``rebuild_shm_tensor`` + the file's path) instead of ``reduce_tensor``'s CUDA IPC handle, and no
device synchronization happens. Every other frame is the upstream wire byte for byte.
"""

from __future__ import annotations

import os
import pickle
import secrets
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from ckpt_engine import (
    ParameterServer,
    ProtocolError,
    PSConfig,
    UpdateAborted,
    UpdateError,
    update_weights_from_ipc,
)
from ckpt_engine.compat import upstream_wire
from ckpt_engine.ipc import IpcBuffer

sys.path.insert(0, str(Path(__file__).resolve().parent))

import upstream_transcript as T

FAIL_TEXT = b"Traceback (most recent call last):\n  ...\nValueError: scripted failure\n"


@pytest.fixture
def host(monkeypatch, tmp_path) -> str:
    """A unique host name: abstract socket names must not collide with concurrent test runs."""
    name = f"compat{os.getpid()}x{secrets.token_hex(3)}"
    monkeypatch.setenv("CKPT_ENGINE_HOSTNAME", name)
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("CKPT_ENGINE_SHM_DIR", str(shm))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("CKPT_ENGINE_WIRE", raising=False)
    return name


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "embed": torch.randn(40, 30, generator=g),  # 4800 bytes: larger than a bucket
        "norm": torch.randn(30, generator=g).to(torch.bfloat16),
        "step": torch.tensor(3),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        **{f"tiny{i}": torch.full((i + 1,), i, dtype=torch.int16) for i in range(20)},
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.view(-1).view(torch.uint8).equal(b.contiguous().view(-1).view(torch.uint8))
    )


# -- the codec ---------------------------------------------------------------------------------
def test_address_is_upstreams():
    assert upstream_wire.address("GPU-e795-76a3", 3) == T.ADDRESS.format(
        uuid="GPU-e795-76a3", counter=3
    )
    assert upstream_wire.address("GPU-x", 0) == "ipc://@checkpoint-engine-GPU-x-0.sock"


def test_encoder_bytes_match_the_transcript():
    assert upstream_wire.encode_none(protocol=4) == T.NONE_P4
    assert upstream_wire.encode_abort(protocol=4) == T.ABORT_P4
    assert upstream_wire.encode_bucket([("a", "BF16", (2, 3), 0)], protocol=4) == T.BUCKET_P4
    assert upstream_wire.OK == T.OK == b""
    # by default exactly what pyzmq's send_pyobj sends for the same objects
    metas = [
        {
            "name": "x.weight",
            "dtype": torch.float8_e4m3fn,
            "shape": torch.Size([4, 8]),
            "offset": 0,
        },
        {"name": "x.bias", "dtype": torch.float32, "shape": torch.Size([8]), "offset": 256},
    ]
    items = [("x.weight", "F8_E4M3", (4, 8), 0), ("x.bias", "F32", (8,), 256)]
    assert upstream_wire.encode_bucket(items) == pickle.dumps(metas, pickle.DEFAULT_PROTOCOL)
    assert upstream_wire.encode_none() == pickle.dumps(None, pickle.DEFAULT_PROTOCOL)


def test_decoder_reads_the_transcript():
    (item,) = upstream_wire.decode(T.BUCKET_P4)
    assert list(item) == ["name", "dtype", "shape", "offset"]
    assert item == {"name": "a", "dtype": torch.bfloat16, "shape": torch.Size([2, 3]), "offset": 0}
    assert type(item["shape"]) is torch.Size
    abort = upstream_wire.decode(T.ABORT_P4)
    assert type(abort) is RuntimeError and str(abort) == "Some workers failed to update weights"
    assert upstream_wire.decode(T.NONE_P4) is None
    assert upstream_wire.decode_reply(T.OK) is None
    assert upstream_wire.decode_reply(FAIL_TEXT).endswith("ValueError: scripted failure\n")
    assert upstream_wire.summary(FAIL_TEXT.decode()) == "ValueError: scripted failure"


CALLED: list[str] = []


def _mark(what: str) -> None:
    CALLED.append(what)


class _Evil:
    def __reduce__(self):
        return (_mark, ("pwned",))


@pytest.mark.parametrize(
    "payload",
    [_Evil(), {"x": os.getpid}, [torch.nn.Linear], (torch.load, ("f",))],
    ids=["reduce-call", "os-function", "torch-module", "torch-load"],
)
def test_decoder_refuses_other_globals(payload):
    data = pickle.dumps(payload)
    with pytest.raises(ProtocolError, match="refusing to unpickle"):
        upstream_wire.decode(data)
    assert CALLED == []
    with pytest.raises(ProtocolError, match="undecodable"):
        upstream_wire.decode(b"\x80\x04garbage")


def test_handle_stand_in_maps_the_buffer_on_the_workers_device(tmp_path):
    ipc = IpcBuffer("cpu", 0, 4096, shm_dir=str(tmp_path), label="compat")
    try:
        ipc.tensor[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
        data = upstream_wire.encode_shm_handle(ipc.handle.path, 4096, device_index=5)
        func, args = upstream_wire.decode(data)
        assert func is upstream_wire.rebuild_shm_tensor and len(args) == 15 and args[6] == 5
        buffer, is_cuda = upstream_wire.rebuild_handle((func, args), 0)
        assert not is_cuda and buffer.numel() == 4096 and buffer[:4].tolist() == [1, 2, 3, 4]
        bad = [
            (torch.Size, args),
            (func, args[:14]),
            (func, (torch.Tensor, *args[1:5], torch.float32, *args[6:])),
            (func, (*args[:7], "/etc/passwd", *args[8:])),
            "not a tuple",
        ]
        for payload in bad:
            with pytest.raises(ProtocolError):
                upstream_wire.rebuild_handle(payload, 0)
    finally:
        ipc.close()


def test_bucket_views_check_every_entry():
    buffer = torch.arange(64, dtype=torch.uint8)
    good = [
        {"name": "a", "dtype": torch.int16, "shape": [2, 3], "offset": 8},
        {"name": "b", "dtype": torch.uint8, "shape": torch.Size([4]), "offset": 60},
    ]
    weights, specs = upstream_wire.bucket_views(good, buffer)
    assert [n for n, _ in weights] == ["a", "b"]
    assert weights[0][1].equal(buffer[8:20].view(torch.int16).view(2, 3))
    assert [(s.name, s.dtype, s.shape) for s in specs] == [("a", "I16", (2, 3)), ("b", "U8", (4,))]
    for entry in [
        {"name": "a", "dtype": torch.int16, "shape": [2, 3]},  # no offset
        {"name": "a", "dtype": torch.int16, "shape": [2, 3], "offset": 7},  # misaligned
        {"name": "a", "dtype": torch.int16, "shape": [40], "offset": 0},  # overruns
        {"name": "a", "dtype": torch.int16, "shape": [-1], "offset": 0},
        {"name": "a", "dtype": "int16", "shape": [1], "offset": 0},
        {"name": 3, "dtype": torch.int16, "shape": [1], "offset": 0},
    ]:
        with pytest.raises(ProtocolError):
            upstream_wire.bucket_views([entry], buffer)


def test_wire_names_are_checked(host):
    with pytest.raises(ValueError, match="supported: ckpt-engine, upstream"):
        update_weights_from_ipc(zmq.Context.instance(), "ipc://@x", 0, run=print, wire="pickle")


def test_upstream_worker_connects_only_to_a_local_ipc_socket(host):
    with pytest.raises(UpdateAborted, match=r"refusing to connect to 'tcp://127\.0\.0\.1:9'"):
        update_weights_from_ipc(
            zmq.Context.instance(), "tcp://127.0.0.1:9", 0, run=print, wire="upstream"
        )


# -- our ParameterServer against upstream's worker, played from the transcript -----------------
@pytest.fixture
def ps(host):
    server = ParameterServer(
        rank=0,
        world_size=1,
        device_type="cpu",
        config=PSConfig(bucket_bytes=4096, timeout_s=5.0, connect_poll_s=0.1),
    )
    server.register_checkpoint("c", named_tensors=tensors())
    server.gather_metas("c")
    yield server
    server.close()


class ScriptedWorker:
    """Plays upstream's worker: REP connects, takes the PS frames, answers as the script says
    (``fail`` names the bucket or stage whose reply is a traceback), reads every bucket."""

    def __init__(self, fail: int | str | None = None) -> None:
        self.fail = fail
        self.frames: list[bytes] = []
        self.kinds: list[tuple] = []
        self.received: dict[str, torch.Tensor] = {}
        self.addresses: list[tuple[str, str]] = []

    def req_func(self, socket_paths):
        self.addresses.append(socket_paths[0])
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REP)
        sock.rcvtimeo = 10_000
        sock.connect(socket_paths[0][1])
        buffer, buckets, nones = None, 0, 0
        try:
            while True:
                frame = sock.recv()
                self.frames.append(frame)
                payload = upstream_wire.decode(frame)
                if isinstance(payload, tuple):
                    self.kinds.append(("ps", "handle"))
                    buffer, _ = upstream_wire.rebuild_handle(payload, 0)
                    stage = "handle"
                elif isinstance(payload, list):
                    self.kinds.append(("ps", "bucket"))
                    weights, _ = upstream_wire.bucket_views(payload, buffer)
                    self.received.update({n: t.clone() for n, t in weights})
                    stage, buckets = buckets, buckets + 1
                elif payload is None:
                    stage = ("release", "post_hook")[nones]
                    self.kinds.append(("ps", stage))
                    nones += 1
                else:
                    self.kinds.append(("ps", "abort"))
                    self.abort = payload
                    return
                if stage == self.fail and stage in ("release", "post_hook"):
                    self.kinds.append(("worker", T.HANGS_UP))  # upstream raises, no reply
                    return
                reply = FAIL_TEXT if stage == self.fail else T.OK
                self.kinds.append(("worker", T.TRACEBACK if reply else T.OK))
                sock.send(reply)
                if stage == "post_hook":
                    return
        finally:
            buffer = None
            sock.close(linger=1000)
            ctx.term()


def bucket_frames(worker: ScriptedWorker) -> list[bytes]:
    return [
        f
        for f, k in zip(worker.frames, [k for k in worker.kinds if k[0] == "ps"])
        if k[1] == "bucket"
    ]


def test_our_ps_speaks_the_transcript(ps):
    worker = ScriptedWorker()
    ps.update("c", worker.req_func, wire="upstream")
    n = len(bucket_frames(worker))
    assert n >= 3
    assert worker.kinds == T.success(n)
    expected = tensors()
    assert set(worker.received) == set(expected)
    assert all(same_bits(worker.received[k], v) for k, v in expected.items())
    assert worker.addresses == [(ps.device_key, T.ADDRESS.format(uuid=ps.device_key, counter=0))]
    slot = None
    for k, frame in enumerate(bucket_frames(worker)):
        metas = upstream_wire.decode(frame)
        assert frame == pickle.dumps(metas, pickle.DEFAULT_PROTOCOL)  # what send_pyobj sends
        assert all(list(m) == ["name", "dtype", "shape", "offset"] for m in metas)
        assert all(
            type(m["shape"]) is torch.Size and isinstance(m["dtype"], torch.dtype) for m in metas
        )
        offsets = [m["offset"] for m in metas]
        assert offsets == sorted(offsets)
        if k == 1:
            slot = offsets[0]  # bucket 1 lives in the second slot of the buffer
        if k % ps.config.num_slots == 0:
            assert offsets[0] == 0
    assert slot is not None and slot > 0
    # the next update binds the next name, as upstream's counter does
    worker2 = ScriptedWorker()
    ps.update("c", worker2.req_func, wire="upstream")
    assert worker2.addresses[0][1] == T.ADDRESS.format(uuid=ps.device_key, counter=1)


@pytest.mark.parametrize("fail", [0, 1, "last", "handle", "release", "post_hook"])
def test_our_ps_aborts_as_upstream_does(ps, fail):
    probe = ScriptedWorker()
    ps.update("c", probe.req_func, wire="upstream")
    n = len(bucket_frames(probe))
    fail = n - 1 if fail == "last" else fail
    worker = ScriptedWorker(fail=fail)
    start = time.monotonic()
    text = "disconnected" if fail in ("release", "post_hook") else "ValueError: scripted failure"
    with pytest.raises(UpdateError, match=text) as info:
        ps.update("c", worker.req_func, wire="upstream")
    assert time.monotonic() - start < 4  # no timeout waited
    if fail == "handle":
        assert worker.kinds == T.handle_fails()
    elif isinstance(fail, int):
        assert worker.kinds == T.run_fails(n, fail)
        assert info.value.bucket == fail
    else:
        assert worker.kinds == T.hook_fails(n, fail)
        return
    assert str(worker.abort).startswith("Some workers failed to update weights")
    # the server is fine afterwards
    ps.update("c", ScriptedWorker().req_func, wire="upstream")


def test_name_taken_fails_the_update(ps):
    squatter = zmq.Context.instance().socket(zmq.REP)
    try:
        squatter.bind(T.ADDRESS.format(uuid=ps.device_key, counter=0))
        with pytest.raises(UpdateError, match="already bound"):
            ps.update("c", ScriptedWorker().req_func, wire="upstream")
    finally:
        squatter.close(linger=0)


# -- our worker against upstream's parameter server, played from the transcript ----------------
class ScriptedPS:
    """Plays upstream's PS: REQ binds the upstream name, sends frames, collects the replies."""

    def __init__(self, host: str, shm_dir: str, nbytes: int = 1 << 16) -> None:
        self.address = upstream_wire.address(f"CPU-{host}-0", 0)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.rcvtimeo = 10_000
        self.sock.bind(self.address)
        self.ipc = IpcBuffer("cpu", 0, nbytes, shm_dir=shm_dir, label="scripted-ps")
        self.replies: list[bytes] = []

    def put(self, items: list[tuple[str, torch.Tensor]], base: int) -> bytes:
        """Copy tensors into the buffer from ``base`` (256-aligned, as upstream does) and return
        the metadata frame exactly as upstream's send_pyobj would."""
        metas, offset = [], base
        for name, t in items:
            raw = t.contiguous().view(-1).view(torch.uint8)
            self.ipc.tensor[offset : offset + raw.numel()] = raw
            metas.append({"name": name, "dtype": t.dtype, "shape": t.shape, "offset": offset})
            offset += (raw.numel() + 255) // 256 * 256
        return pickle.dumps(metas, pickle.DEFAULT_PROTOCOL)

    def handle(self) -> bytes:
        return upstream_wire.encode_shm_handle(self.ipc.handle.path, self.ipc.nbytes, 3)

    def ask(self, frame: bytes) -> bytes:
        self.sock.send(frame)
        self.replies.append(self.sock.recv())
        return self.replies[-1]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        self.ipc.close()


class OurWorker:
    """Our update_weights_from_ipc(wire=...) on a thread, recording what it was given."""

    def __init__(self, address: str, fail_at: int | None = None, **kwargs) -> None:
        self.received: dict[str, torch.Tensor] = {}
        self.post_hooks, self.validated, self.error, self.runs = 0, None, None, 0
        self.fail_at = fail_at

        def run(weights):
            self.runs += 1
            if self.runs - 1 == fail_at:
                raise ValueError(f"injected failure at bucket {fail_at}")
            self.received.update({n: t.clone() for n, t in weights})

        def post_hook():
            self.post_hooks += 1

        def validate(specs):
            self.validated = [s.name for s in specs]

        def target():
            try:
                update_weights_from_ipc(
                    self.ctx, address, 0, run=run, post_hook=post_hook, validate=validate, **kwargs
                )
            except Exception as e:
                self.error = e

        self.ctx = zmq.Context()
        self.thread = threading.Thread(target=target)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(15)
        assert not self.thread.is_alive()
        self.ctx.term()


def buckets_of(src: dict[str, torch.Tensor]) -> list[list[tuple[str, torch.Tensor]]]:
    items = list(src.items())
    return [items[:10], items[10:20], items[20:]]


def test_our_worker_follows_the_transcript(host, tmp_path):
    ps = ScriptedPS(host, str(tmp_path / "shm"))
    worker = OurWorker(ps.address, wire="upstream", timeout_s=10)
    try:
        src = tensors()
        parts = buckets_of(src)
        assert ps.ask(ps.handle()) == T.OK
        for k, part in enumerate(parts):
            assert ps.ask(ps.put(part, (k % 2) * 32768)) == T.OK
        assert ps.ask(pickle.dumps(None)) == T.OK
        assert worker.post_hooks == 0 and worker.validated == list(src)
        assert ps.ask(pickle.dumps(None)) == T.OK
        worker.join()
    finally:
        ps.close()
    assert worker.error is None and worker.post_hooks == 1
    assert set(worker.received) == set(src)
    assert all(same_bits(worker.received[k], v) for k, v in src.items())


def test_the_environment_opts_the_worker_in(host, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_ENGINE_WIRE", "upstream")
    ps = ScriptedPS(host, str(tmp_path / "shm"))
    worker = OurWorker(ps.address, timeout_s=10)
    try:
        assert ps.ask(ps.handle()) == T.OK
        assert ps.ask(pickle.dumps(None)) == T.OK
        assert ps.ask(pickle.dumps(None)) == T.OK
        worker.join()
    finally:
        ps.close()
    assert worker.error is None and worker.post_hooks == 1


def test_our_worker_fails_cleanly_when_run_raises(host, tmp_path):
    ps = ScriptedPS(host, str(tmp_path / "shm"))
    worker = OurWorker(ps.address, fail_at=1, wire="upstream", timeout_s=10)
    try:
        parts = buckets_of(tensors())
        assert ps.ask(ps.handle()) == T.OK
        assert ps.ask(ps.put(parts[0], 0)) == T.OK
        reply = ps.ask(ps.put(parts[1], 32768))
        assert b"ValueError: injected failure at bucket 1" in reply
        ps.sock.send(pickle.dumps(RuntimeError("Some workers failed to update weights")))
        worker.join()  # no reply to the abort: the worker raises
    finally:
        ps.close()
    assert isinstance(worker.error, UpdateAborted)
    assert "Some workers failed" in str(worker.error) and "injected failure" in str(worker.error)
    assert worker.post_hooks == 0


def test_our_worker_refuses_to_commit_when_upstream_ignores_the_last_failure(host, tmp_path):
    """Upstream's PS reads neither the last bucket's reply nor the None replies."""
    ps = ScriptedPS(host, str(tmp_path / "shm"))
    worker = OurWorker(ps.address, fail_at=0, wire="upstream", timeout_s=10)
    try:
        assert ps.ask(ps.handle()) == T.OK
        assert b"injected failure" in ps.ask(ps.put(buckets_of(tensors())[0], 0))
        assert ps.ask(pickle.dumps(None)) != T.OK
        assert ps.ask(pickle.dumps(None)) != T.OK
        worker.join()
    finally:
        ps.close()
    assert isinstance(worker.error, UpdateAborted) and "post_hook skipped" in str(worker.error)
    assert worker.post_hooks == 0


def test_our_worker_runs_no_pickled_code(host, tmp_path):
    ps = ScriptedPS(host, str(tmp_path / "shm"))
    worker = OurWorker(ps.address, wire="upstream", timeout_s=10)
    try:
        reply = ps.ask(pickle.dumps(_Evil()))
        assert b"refusing to unpickle" in reply
        ps.sock.send(pickle.dumps(RuntimeError("ack")))  # upstream's worker waits for one more
        worker.join()
    finally:
        ps.close()
    assert CALLED == [] and isinstance(worker.error, UpdateAborted)


def test_our_worker_sees_the_ps_vanish(host, tmp_path):
    ps = ScriptedPS(host, str(tmp_path / "shm"))
    worker = OurWorker(ps.address, wire="upstream", timeout_s=30)
    start = time.monotonic()
    try:
        assert ps.ask(ps.handle()) == T.OK
    finally:
        ps.close()
    worker.join()
    assert isinstance(worker.error, UpdateAborted) and "disconnected" in str(worker.error)
    assert time.monotonic() - start < 10


# -- both of ours, over the upstream wire -----------------------------------------------------
def test_our_ps_drives_our_worker_over_the_upstream_wire(ps):
    results = {}

    def req_func(socket_paths):
        ((_key, address),) = socket_paths
        worker = OurWorker(address, fail_at=results.get("fail_at"), wire="upstream", timeout_s=10)
        worker.join()
        results["worker"] = worker
        if worker.error is not None:
            raise worker.error

    ps.update("c", req_func, wire="upstream")
    worker = results["worker"]
    expected = tensors()
    assert worker.error is None and worker.post_hooks == 1
    assert all(same_bits(worker.received[k], v) for k, v in expected.items())
    results["fail_at"] = 1
    with pytest.raises(UpdateError, match="injected failure at bucket 1") as info:
        ps.update("c", req_func, wire="upstream")
    assert info.value.bucket == 1 and isinstance(results["worker"].error, UpdateAborted)


# -- two rank processes, each with its worker process, over the upstream wire -----------------
@pytest.mark.slow
def test_two_ranks_over_the_upstream_wire(tmp_path, port):
    """The multi-process suite of test_ps_update (bit-exact checks, flat resources, a raising
    run, a killed worker, a raising req_func), every update over the upstream wire."""
    import test_ps_update as U

    steps = [
        *U.flat_then_failures(last_rank=1),
        {
            "op": "update",
            "step": "req_func_raises",
            "inject": {"kind": "req_func_raises", "rank": 1},
        },
        {"op": "update", "step": "final"},
    ]
    host = f"compat{os.getpid()}x{secrets.token_hex(3)}n"
    records, codes = U.run_ranks(
        tmp_path, 2, steps, port=port, per_node=2, wire="upstream", host_prefix=host
    )
    assert codes == [0, 0], U.logs(tmp_path)
    U.check_flat_then_failures(records, (0, 1))
    text = "injected req_func failure"
    U.assert_failed_everywhere(records, (0, 1), "req_func_raises", rank=1, bucket=None, text=text)
    assert all(U.updates(records[r], "final")[0]["ok"] for r in (0, 1))
