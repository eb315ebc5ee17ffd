"""The worker primitive against a scripted parameter server (same process, CPU)."""

import gc
import math
import threading

import pytest
import torch
import zmq

from ckpt_engine import UpdateAborted, dtypes, update_weights_from_ipc, wire
from ckpt_engine.ipc import IpcBuffer

SLOT = 1024
A = torch.arange(4, dtype=torch.float32)
B = torch.tensor([-1, 0, 1], dtype=torch.int8)
SPECS = [
    wire.TensorSpec("a", "F32", (4,)),
    wire.TensorSpec("b", "I8", (3,)),
    wire.TensorSpec("s", "BF16", ()),
]
MANIFEST = wire.Manifest.of(SPECS)
LAYOUT = wire.Layout(counts=(1, 2), offsets=(0, 256, 512))


def private_dir(tmp_path):
    """A directory shaped like a parameter server's socket directory (the worker checks it)."""
    path = tmp_path / "ckpt-engine-test"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


class FakePS:
    def __init__(self, tmp_path):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.linger = 0
        self.address = f"ipc://{private_dir(tmp_path)}/ps.sock"
        self.sock.bind(self.address)
        self.tmp_path = tmp_path
        self.ipc = IpcBuffer("cpu", 0, 2 * SLOT, shm_dir=str(tmp_path), label="test")
        self.ipc.tensor[0:16] = A.view(torch.uint8)
        self.ipc.tensor[SLOT + 256 : SLOT + 259] = B.view(torch.uint8)
        self.ipc.tensor[SLOT + 512 : SLOT + 514] = (
            torch.tensor(2.5, dtype=torch.bfloat16).reshape(1).view(torch.uint8)
        )

    def plan(self, **overrides):
        fields = dict(
            update_id="u",
            rank=0,
            device_key="CPU-h-0",
            buffer=self.ipc.handle,
            num_slots=2,
            slot_bytes=SLOT,
            num_buckets=2,
            recv_timeout_s=5.0,
            manifest=MANIFEST,
            layout=LAYOUT,
        )
        fields.update(overrides)
        return wire.Plan(**fields)

    def bucket(self, i, slot=None):
        return wire.Bucket(update_id="u", id=i, slot=i % 2 if slot is None else slot)

    def request(self, msg):
        self.sock.send(msg if isinstance(msg, bytes) else wire.encode(msg))
        assert self.sock.poll(10_000), "worker did not answer"
        return wire.decode(self.sock.recv())

    def reopen(self, name):
        """A fresh socket at a new address, as each update of a real PS has (a REQ socket
        reused across workers may still route to the last one, already gone)."""
        self.sock.close()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.linger = 0
        self.address = f"ipc://{private_dir(self.tmp_path)}/{name}.sock"
        self.sock.bind(self.address)

    def close(self):
        self.sock.close()
        self.ctx.term()
        self.ipc.close()


class Worker(threading.Thread):
    def __init__(self, address, **kwargs):
        super().__init__(daemon=True)
        self.address, self.kwargs = address, kwargs
        self.calls, self.post_hooks, self.error = [], 0, None
        self.kwargs.setdefault("run", self.run_weights)
        self.kwargs.setdefault("post_hook", self.post_hook)
        self.start()

    def run_weights(self, weights):
        self.calls.append([(n, t.clone()) for n, t in weights])

    def post_hook(self):
        self.post_hooks += 1

    def run(self):
        ctx = zmq.Context()
        try:
            update_weights_from_ipc(ctx, self.address, 0, **self.kwargs)
        except BaseException as e:
            self.error = e
        finally:
            ctx.term()

    def result(self):
        self.join(20)
        assert not self.is_alive()
        return self.error


@pytest.fixture
def ps(tmp_path):
    server = FakePS(tmp_path)
    yield server
    server.close()


def test_full_update(ps):
    seen = []
    w = Worker(ps.address, validate=lambda manifest: seen.extend(manifest))
    assert ps.request(ps.plan()) == wire.Ack("u", "plan")
    assert seen == SPECS
    assert ps.request(ps.bucket(0)) == wire.Ack("u", "bucket", 0)
    assert ps.request(ps.bucket(1)) == wire.Ack("u", "bucket", 1)
    assert ps.request(wire.Done("u")) == wire.Ack("u", "done")
    assert w.post_hooks == 0  # not before every rank succeeded
    assert ps.request(wire.Commit("u")) == wire.Ack("u", "commit")
    assert w.result() is None and w.post_hooks == 1
    (a,), (b, s) = w.calls
    assert a[0] == "a" and torch.equal(a[1], A)
    assert b[0] == "b" and torch.equal(b[1], B)
    assert s[1].shape == () and s[1].item() == 2.5


def expect_abort(ps, w, cause=None):
    assert ps.request(wire.Abort("u", "rank 3 failed")) == wire.Ack("u", "abort")
    error = w.result()
    assert isinstance(error, UpdateAborted) and "rank 3 failed" in str(error)
    if cause is not None:
        assert isinstance(error.__cause__, cause)
    assert w.post_hooks == 0


def test_validate_rejects_before_anything_is_written(ps):
    def validate(manifest):
        raise KeyError("unknown tensor b")

    w = Worker(ps.address, validate=validate)
    reply = ps.request(ps.plan())
    assert (
        isinstance(reply, wire.Error)
        and reply.stage == "plan"
        and "unknown tensor b" in reply.message
    )
    expect_abort(ps, w, KeyError)
    assert w.calls == []


def test_run_raising_reports_bucket_and_message(ps):
    def run(weights):
        if weights[0][0] == "b":
            raise ValueError("shape mismatch in layer 7")

    w = Worker(ps.address, run=run)
    ps.request(ps.plan())
    ps.request(ps.bucket(0))
    reply = ps.request(ps.bucket(1))
    assert isinstance(reply, wire.Error) and reply.bucket == 1 and reply.stage == "bucket"
    assert (
        "ValueError: shape mismatch in layer 7" in reply.message and "Traceback" in reply.traceback
    )
    # anything but Abort is refused now
    assert isinstance(ps.request(wire.Done("u")), wire.Error)
    expect_abort(ps, w, ValueError)


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("order", "expected bucket 0"),
        ("slot", "slot 2 out of range"),
        ("garbage", "not JSON"),
        ("commit_early", "unexpected commit"),
        ("missing", "never delivered"),
    ],
)
def test_protocol_violations_are_errors(ps, bad, problem):
    w = Worker(ps.address)
    ps.request(ps.plan())
    msg = {
        "order": ps.bucket(1),
        "slot": ps.bucket(0, slot=2),
        "garbage": b"\x80\x04not json",
        "commit_early": wire.Commit("u"),
        "missing": wire.Done("u"),
    }[bad]
    reply = ps.request(msg)
    assert isinstance(reply, wire.Error) and problem in reply.message
    expect_abort(ps, w)


@pytest.mark.parametrize(
    ("plan", "problem"),
    [
        ({"layout": wire.Layout((1, 2), (SLOT - 8, 256, 512))}, "overrun the slot"),
        ({"layout": wire.Layout((1, 2), (2, 256, 512))}, "misaligned for F32"),
        # 2^62 F32 elements: 2^64 bytes, 0 in int64 arithmetic; must not pass as fitting
        ({"manifest": wire.Manifest.of([("a", "F32", (2**62,)), *SPECS[1:]])}, "overrun"),
        ({"manifest": wire.Manifest.of([("a", "F32", (2**32, 2**32)), *SPECS[1:]])}, "overrun"),
        ({"manifest": wire.Manifest.of([*SPECS[:2], SPECS[0]])}, "'a' appears twice"),
        ({"slot_bytes": SLOT - 2, "num_slots": 1}, "not a multiple of F32's"),
        ({"num_slots": 3}, "cannot hold 3 slots"),
    ],
)
def test_bad_plans_are_refused_before_any_bucket(ps, plan, problem):
    w = Worker(ps.address)
    reply = ps.request(ps.plan(**plan))
    assert isinstance(reply, wire.Error) and reply.stage == "plan" and problem in reply.message
    assert ps.request(wire.Abort("u", "rank 3 failed")).of == "abort"
    assert isinstance(w.result(), UpdateAborted) and w.calls == []


def test_many_tensors_views_and_empty_tensors(ps):
    """Views of many tensors of mixed dtypes in both slots, zero-size ones included."""
    specs, offsets, counts = [], [], []
    for b in range(2):
        end = 0
        for i in range(100):
            dtype, shape = ("F32", (2,)) if i % 3 else ("BF16", (0, 4) if i % 5 == 0 else (3,))
            size = 4 if dtype == "F32" else 2
            end = (end + size - 1) // size * size
            specs.append(wire.TensorSpec(f"t{b}.{i}", dtype, shape))
            offsets.append(end)
            end += size * math.prod(shape)
        counts.append(100)
    values = torch.arange(SLOT, dtype=torch.uint8)
    ps.ipc.tensor[: 2 * SLOT] = torch.cat([values, values.flip(0)])
    w = Worker(ps.address)
    plan = ps.plan(
        manifest=wire.Manifest.of(specs), layout=wire.Layout(tuple(counts), tuple(offsets))
    )
    assert ps.request(plan) == wire.Ack("u", "plan")
    assert ps.request(ps.bucket(0, slot=1)) == wire.Ack("u", "bucket", 0)
    assert ps.request(ps.bucket(1, slot=0)) == wire.Ack("u", "bucket", 1)
    ps.request(wire.Done("u"))
    ps.request(wire.Commit("u"))
    assert w.result() is None
    got = [pair for call in w.calls for pair in call]
    assert [n for n, _ in got] == [s.name for s in specs]
    for (name, t), spec, off, k in zip(got, specs, offsets, [1] * 100 + [0] * 100):
        slot = ps.ipc.tensor[k * SLOT : (k + 1) * SLOT]
        raw = slot[off : off + t.numel() * t.element_size()]
        assert t.dtype == dtypes.to_torch(spec.dtype) and tuple(t.shape) == spec.shape, name
        assert torch.equal(t.reshape(-1).view(torch.uint8), raw), name


def test_a_repeated_plan_is_recognised_and_its_views_stay_right(ps):
    """The second update of the same plan (two frames, the same columns) reuses the parsed and
    checked columns; every tensor still arrives right."""
    import ckpt_engine.worker as worker_module

    accepted = []
    for update in ("first", "second"):
        ps.reopen(update)
        w = Worker(ps.address)
        ps.sock.send_multipart(wire.encode_frames(ps.plan()))
        assert ps.sock.poll(10_000), "no reply to the plan"
        assert wire.decode(ps.sock.recv()) == wire.Ack("u", "plan")
        accepted.append(worker_module._accepted)
        for k in range(2):
            assert ps.request(ps.bucket(k)) == wire.Ack("u", "bucket", k)
        ps.request(wire.Done("u"))
        ps.request(wire.Commit("u"))
        assert w.result() is None
        (a,), (b, s) = w.calls
        assert torch.equal(a[1], A) and torch.equal(b[1], B) and s[1].item() == 2.5
    assert accepted[0] is accepted[1]


def test_no_message_times_out(ps):
    w = Worker(ps.address, timeout_s=0.3)
    error = w.result()
    assert isinstance(error, UpdateAborted) and "within 0.3 s" in str(error)


def test_parameter_server_vanishing_is_noticed_at_once(ps):
    w = Worker(ps.address)
    ps.request(ps.plan(recv_timeout_s=60))
    ps.sock.close()  # the PS process "dies"
    error = w.result()
    assert isinstance(error, UpdateAborted) and "disconnected" in str(error)


def test_nothing_listening(tmp_path):
    w = Worker(f"ipc://{private_dir(tmp_path)}/nobody.sock")
    error = w.result()
    assert isinstance(error, UpdateAborted) and "no parameter server" in str(error)


def test_garbage_first_message_is_an_abort(ps):
    w = Worker(ps.address)
    ps.sock.send(b"\x80\x04not json")
    error = w.result()
    assert isinstance(error, UpdateAborted) and "bad first message" in str(error)
    assert w.calls == [] and w.post_hooks == 0


@pytest.mark.parametrize(
    "address, why",
    [
        ("tcp://127.0.0.1:5555", "local ipc:// socket"),
        ("inproc://x", "local ipc:// socket"),
        ("ipc://@someone-else", "abstract ckpt-engine"),
        ("ipc:///tmp/x.sock", "private directory"),
        ("ipc://{tmp}/ckpt-engine-test/../ps.sock", "private directory"),
        ("ipc://{tmp}/ckpt-engine-open/ps.sock", "not a private directory"),
        ("ipc://{tmp}/ckpt-engine-none/ps.sock", "no parameter server socket directory"),
    ],
)
def test_worker_connects_only_to_a_private_local_socket(tmp_path, address, why):
    private_dir(tmp_path)
    (tmp_path / "ckpt-engine-open").mkdir(mode=0o755)
    (tmp_path / "ckpt-engine-open").chmod(0o755)
    w = Worker(address.format(tmp=tmp_path), timeout_s=0.5)
    error = w.result()
    assert isinstance(error, UpdateAborted) and why in str(error), error


def test_collector_paused_during_run_only(ps):
    """A bucket's views and ``run`` see the cyclic collector paused (thousands of views per
    bucket would each set off collections over the engine's heap); it runs again afterwards,
    also when ``run`` raises."""
    states = []

    def run(weights):
        states.append(gc.isenabled())
        if weights[0][0] == "b":
            raise ValueError("refused")

    assert gc.isenabled()
    w = Worker(ps.address, run=run)
    ps.request(ps.plan())
    assert ps.request(ps.bucket(0)) == wire.Ack("u", "bucket", 0)
    assert gc.isenabled()
    assert isinstance(ps.request(ps.bucket(1)), wire.Error)
    expect_abort(ps, w, ValueError)
    assert states == [False, False] and gc.isenabled()
