"""ckpt_engine.ps.gather: many small device tensors packed on their device, then one
device-to-host copy per segment.

CPU: the layout (``plan``: segments and their pads, as a table and against ``named.pack`` on
random layouts), the pack (``pack``, device-agnostic: bit-exact for every storable dtype, NaN
payloads and bool bytes other than 0/1 included, strided, overlapping and 0-dim tensors, pads
zero), and ``copy_gathered`` whole with its stream calls faked (bytes, the order of events and
waits, at most two packed segments alive, failures).
GPU: registrations of thousands of tensors (runs of every dtype, strided, empty, larger than a
segment, host-held ones between them) whose producing kernels are still queued behind a spin
kernel, with small segments (hundreds of them): every byte exact, the copy stream idle on
return; a failure midway leaves no copy running.
"""

from __future__ import annotations

import contextlib
import random
import weakref

import pytest
import torch

from ckpt_engine import CheckpointError, dtypes
from ckpt_engine.ps import gather
from ckpt_engine.ps import named as named_mod
from ckpt_engine.ps.gather import Segment, plan
from ckpt_engine.ps.named import pack

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
U8, BF16, F32 = torch.uint8, torch.bfloat16, torch.float32


def raw(t: torch.Tensor) -> bytes:
    """The bytes of ``t`` in row-major order, read as an integer of its width first (no value
    converted on the way: NaN payloads, bool bytes other than 0 and 1 kept)."""
    t = t.detach().view(_INT[t.dtype.itemsize]).cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


# -- plan ------------------------------------------------------------------------------------------
def seg(buffer, start, nbytes, indices, pads):
    return Segment(buffer, start, nbytes, tuple(indices), tuple(pads))


@pytest.mark.parametrize(
    ("sizes", "kinds", "gathered", "staging", "want"),
    [
        # adjacent tensors of one dtype, pads between them: one segment
        ([100, 256, 10], [U8] * 3, [0, 1, 2], 4096, [seg(0, 0, 522, [0, 1, 2], [156, 0, 0])]),
        # a tensor with bytes not gathered ends it; an empty one does not
        ([100, 300, 10], [U8] * 2, [0, 2], 4096,
         [seg(0, 0, 100, [0], [0]), seg(0, 768, 10, [2], [0])]),
        ([100, 0, 10], [U8] * 2, [0, 2], 4096, [seg(0, 0, 266, [0, 2], [156, 0])]),
        # a change of dtype ends it
        ([256, 256, 256], [BF16, BF16, F32], [0, 1, 2], 4096,
         [seg(0, 0, 512, [0, 1], [0, 0]), seg(0, 512, 256, [2], [0])]),
        # the staging bound (a tensor exactly as large as it fits)
        ([256, 256, 512], [U8] * 3, [0, 1, 2], 512,
         [seg(0, 0, 512, [0, 1], [0, 0]), seg(0, 512, 512, [2], [0])]),
        ([], [], [], 512, []),
    ],
)  # fmt: skip
def test_plan_table(sizes, kinds, gathered, staging, want):
    _, where, offsets = pack(sizes)
    assert plan(gathered, sizes, where, offsets, kinds, staging_bytes=staging) == want


def test_plan_gaps_that_are_not_pads():
    """Laid out by hand: a gap of ALIGN or more, or not whole elements, ends a segment."""
    sizes, where = [4, 4, 4, 4], [0, 0, 0, 0]
    offsets = [0, 4, 8 + 256, 8 + 256 + 4 + 2]
    got = plan(range(4), sizes, where, offsets, [F32] * 4, staging_bytes=4096)
    assert got == [seg(0, 0, 8, [0, 1], [0, 0]), seg(0, 264, 4, [2], [0]),
                   seg(0, 270, 4, [3], [0])]  # fmt: skip


def test_plan_across_buffers(monkeypatch):
    monkeypatch.setattr(named_mod, "NAMED_CHUNK_BYTES", 1024)
    sizes = [500, 300, 600, 10]
    _, where, offsets = pack(sizes)
    assert where == [0, 0, 1, 1]
    assert plan(range(4), sizes, where, offsets, [U8] * 4, staging_bytes=4096) == [
        seg(0, 0, 812, [0, 1], [12, 0]),
        seg(1, 0, 778, [2, 3], [168, 0]),
    ]


@pytest.mark.parametrize(
    ("sizes", "gathered", "offsets"),
    [
        ([10, 0], [0, 1], None),  # empty
        ([10, 600], [0, 1], None),  # larger than the staging
        ([10, 10], [1, 0], None),  # not ascending
        ([10, 10], [0, 1], [0, 5]),  # overlapping
    ],
)
def test_plan_rejects_what_it_cannot_lay_out(sizes, gathered, offsets):
    _, where, packed = pack(sizes)
    with pytest.raises(ValueError):
        plan(gathered, sizes, where, offsets or packed, [U8] * 2, staging_bytes=512)


@pytest.mark.parametrize("seed", range(20))
def test_plan_random_layouts(seed, monkeypatch):
    """Each segment: one buffer, one dtype, within the staging bound, its tensors and pads
    filling its range exactly, no byte of a tensor outside it; the indices partitioned."""
    monkeypatch.setattr(named_mod, "NAMED_CHUNK_BYTES", 1 << 14)
    rng = random.Random(seed)
    kinds_of = [rng.choice([U8, BF16, F32]) for _ in range(300)]
    for i in range(1, 300):  # runs of one dtype, as in a model
        kinds_of[i] = kinds_of[i - 1] if rng.random() < 0.8 else kinds_of[i]
    sizes = [rng.choice([0, 1, 3, 77, 256, 300, 1000, 4096]) * kinds_of[i].itemsize
             for i in range(300)]  # fmt: skip
    _, where, offsets = pack(sizes)
    staging = rng.choice([4096, 8192, 1 << 14]) * 4
    gathered = [i for i, n in enumerate(sizes) if n and rng.random() < 0.8]
    got = plan(gathered, sizes, where, offsets, [kinds_of[i] for i in gathered],
               staging_bytes=staging)  # fmt: skip
    assert [i for s in got for i in s.indices] == gathered
    for s in got:
        assert 0 < s.nbytes <= staging and len({kinds_of[i] for i in s.indices}) == 1
        at = s.start
        for i, pad in zip(s.indices, s.pads):
            assert (where[i], offsets[i]) == (s.buffer, at)
            at += sizes[i] + pad
        assert at == s.start + s.nbytes and s.pads[-1] == 0
        for j, n in enumerate(sizes):
            if n and where[j] == s.buffer and j not in s.indices:
                assert offsets[j] + n <= s.start or s.start + s.nbytes <= offsets[j]


# -- pack ------------------------------------------------------------------------------------------
def mixed_tensors(device, n: int, *, run: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` tensors, runs of ``run`` of one storable dtype, random bits (bool bytes other
    than 0 and 1, NaNs with payloads), 0-dim ones, strided ones (a transpose, every other
    row, an expanded view), each a view of its own uint8 tensor on ``device``."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    kinds = list(map(dtypes.to_torch, dtypes.SUPPORTED))
    for i in range(n):
        dtype = kinds[i // run % len(kinds)]
        shape = [(), (5,), (3, 7), (2, 3, 5), (64,)][i % 5]
        numel = torch.Size(shape).numel()
        bits = torch.randint(0, 256, (max(42, numel) * dtype.itemsize,), generator=g,
                             dtype=torch.uint8).to(device)  # fmt: skip
        t = bits.view(dtype)[:numel].reshape(shape)
        if i % 11 == 3 and len(shape) == 2:
            t = t.t()  # strided
        elif i % 11 == 5 and len(shape) == 2:
            t = bits.view(dtype)[:42].reshape(6, 7)[::2]  # every other row
        elif i % 11 == 7:
            t = t.reshape(-1)[:1].expand(4)  # overlapping: four times the same element
        out[f"t{i}.{str(dtype).removeprefix('torch.')}"] = t
    nans = torch.tensor([0x7FC1, 0xFFC2 - (1 << 16), 0x7F81, 0xFF80 - (1 << 16), 1],
                        dtype=torch.int16)  # fmt: skip
    out["nans"] = nans.to(device).view(torch.bfloat16)
    out["nans2"] = nans.flip(0).to(device).view(torch.bfloat16)
    return out


def layout(named: dict[str, torch.Tensor]):
    sizes = [t.nbytes for t in named.values()]
    chunks, where, offsets = pack(sizes)
    return sizes, chunks, where, offsets


@pytest.mark.parametrize("run", [1, 7, 40])
def test_pack_is_bit_exact_pads_zero(run):
    named = mixed_tensors("cpu", 200, run=run)
    sizes, _, where, offsets = layout(named)
    tensors = list(named.values())
    ix = [i for i, n in enumerate(sizes) if n]
    segments = plan(ix, sizes, where, offsets, [tensors[i].dtype for i in ix],
                    staging_bytes=1 << 20)  # fmt: skip
    assert any(len(s.indices) > 1 for s in segments)
    assert any(len(s.indices) > 1 and any(s.pads) for s in segments)
    zeros: dict = {}
    for s in segments:
        got = gather.pack(s, tensors, zeros).numpy().tobytes()
        assert b"".join(raw(tensors[i]) + b"\0" * p for i, p in zip(s.indices, s.pads)) == got
    assert zeros and all(not z.view(torch.uint8).any() for z in zeros.values())


# -- copy_gathered, the stream calls faked ---------------------------------------------------------
class FakeStreams:
    """The CUDA calls of ``_copy_segments`` on CPU: streams and events that log what they are
    asked (the copies themselves run at once), and the packed segments alive."""

    def __init__(self, monkeypatch) -> None:
        self.log: list[tuple] = []
        self.alive: list[int] = []  # packed segments alive after each pack
        log, events = self.log, iter(range(10**6))

        class Stream:
            def __init__(self, name):
                self.name = name

            def wait_event(self, event):
                log.append((self.name, "waits", event.id))

            def synchronize(self):
                log.append((self.name, "synchronized"))

        class Event:
            def __init__(self):
                self.id = next(events)

            def record(self, stream):
                log.append((stream.name, "records", self.id))

            def synchronize(self):
                log.append(("host", "waits", self.id))

        current, copier = Stream("current"), Stream("copier")
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device: current)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: None)
        monkeypatch.setattr(gather, "_copy_stream", lambda device: copier)
        monkeypatch.setattr(
            gather, "gatherable", lambda tensors, ix, **kw: {torch.device("cpu"): list(ix)}
        )
        live: list = []
        real_pack = gather.pack

        def pack(*args):
            flat = real_pack(*args)
            live.append(weakref.ref(flat))
            self.alive.append(sum(r() is not None for r in live))
            return flat

        monkeypatch.setattr(gather, "pack", pack)


def test_copy_gathered_with_fake_streams(monkeypatch):
    """Every byte lands (a lone tensor's segment left to the caller); per segment: packed on
    the current stream, an event, the copy stream waits for it, copies, records its own; the
    host waits for segment k-2's copy before packing segment k (two alive at most); the copy
    stream synchronized last."""
    monkeypatch.setattr(named_mod, "NAMED_CHUNK_BYTES", 1 << 13)
    fake = FakeStreams(monkeypatch)
    named = mixed_tensors("cpu", 400, run=9, seed=2)
    sizes, chunks, where, offsets = layout(named)
    tensors, names = list(named.values()), list(named)
    host = [torch.full((n,), 0xAB, dtype=torch.uint8) for n in chunks]
    ix = [i for i, n in enumerate(sizes) if n]
    rest = gather.copy_gathered(host, names, tensors, ix, sizes, where, offsets,
                                staging_bytes=2048)  # fmt: skip
    segments = plan(ix, sizes, where, offsets, [tensors[i].dtype for i in ix], staging_bytes=2048)
    assert rest == [s.indices[0] for s in segments if len(s.indices) == 1] != []
    for i, (t, n) in enumerate(zip(tensors, sizes)):
        got = host[where[i]][offsets[i] : offsets[i] + n].numpy().tobytes()
        assert got == (b"\xab" * n if i in rest else raw(t)), names[i]
    assert max(fake.alive) <= 3 and fake.log[-1] == ("copier", "synchronized")
    steps, done = fake.log[:-1], []
    while steps:
        if len(done) >= 2:
            assert steps.pop(0) == ("host", "waits", done[-2])
        (who, what, packed), wait, (by, rec, d) = steps[:3]
        del steps[:3]
        assert (who, what, wait) == ("current", "records", ("copier", "waits", packed))
        assert (by, rec) == ("copier", "records")
        done.append(d)
    assert len(done) == sum(len(s.indices) > 1 for s in segments) > 10


def test_copy_gathered_failures_with_fake_streams(monkeypatch):
    """A pack that fails leaves its tensors to the caller's copies; a copy to host that fails
    raises CheckpointError naming the segment's first tensor, the copy stream synchronized."""
    fake = FakeStreams(monkeypatch)
    named = {f"w{i}": torch.full((64,), i, dtype=torch.int32) for i in range(40)}
    sizes, chunks, where, offsets = layout(named)
    tensors, names = list(named.values()), list(named)
    host = [torch.zeros(n, dtype=torch.uint8) for n in chunks]
    real_pack, calls = gather.pack, []

    def failing(segment, *args):
        calls.append(segment)
        if len(calls) == 2:
            raise RuntimeError("injected pack failure")
        return real_pack(segment, *args)

    monkeypatch.setattr(gather, "pack", failing)
    rest = gather.copy_gathered(host, names, tensors, range(40), sizes, where, offsets,
                                staging_bytes=2048)  # fmt: skip
    assert rest == list(calls[1].indices) and len(calls) == 5
    assert fake.log[-1] == ("copier", "synchronized")

    fake.log.clear()
    monkeypatch.setattr(gather, "pack", real_pack)
    host[0] = torch.zeros(100, dtype=torch.uint8)  # too short: the first copy fails
    with pytest.raises(CheckpointError, match=r"named_tensors\['w0'\] and the 7 tensors after"):
        gather.copy_gathered(host, names, tensors, range(40), sizes, where, offsets,
                             staging_bytes=2048)  # fmt: skip
    assert fake.log[-1] == ("copier", "synchronized")


def test_cpu_tensors_are_not_gathered():
    named = mixed_tensors("cpu", 40)
    sizes, _, where, offsets = layout(named)
    assert gather.gatherable(list(named.values()), range(len(named)), min_tensors=1) == {}
    assert gather.copy_gathered([], list(named), list(named.values()), [3, 1], sizes, where,
                                offsets) == [3, 1]  # fmt: skip


# -- GPU -------------------------------------------------------------------------------------------
def registry(tmp_path):
    from registry_testutil import make_registry

    return make_registry(tmp_path, pin=True, pool_bytes=1 << 30)


def gpu_weights(seed: int) -> dict[str, torch.Tensor]:
    """3,000 small tensors in runs of 40 of one dtype (every storable one; strided, 0-dim and
    expanded ones among them), empty ones, tensors larger than a segment (copied alone) and
    host-held ones between them (segments end there)."""
    items = list(mixed_tensors("cuda", 3000, run=40, seed=seed).items())
    for k in (100, 1700):
        items.insert(k, (f"big{k}", torch.randn(3 << 20, device="cuda")))  # 12 MiB
    for k in (5, 6, 900, 2500):
        items.insert(k, (f"host{k}", torch.randn(33)))
    for k in (7, 1000):
        items.insert(k, (f"empty{k}", torch.empty(0, 3, device="cuda")))
    return dict(items)


def lone(weights: dict[str, torch.Tensor], staging: int) -> int:
    """How many of ``weights``' packable tensors are alone in their segment."""
    tensors = list(weights.values())
    sizes, _, where, offsets = layout(weights)
    ix = [i for i, t in enumerate(tensors) if t.is_cuda and 0 < t.nbytes <= staging]
    segments = plan(ix, sizes, where, offsets, [tensors[i].dtype for i in ix],
                    staging_bytes=staging)  # fmt: skip
    return sum(len(s.indices) == 1 for s in segments)


class Watch:
    """Counts of ``pack`` calls and of per-tensor copies; the copy streams made."""

    def __init__(self, monkeypatch) -> None:
        self.packs, self.per_tensor, self.streams = 0, 0, []
        real_pack, real_copy_into, real_stream = (
            gather.pack,
            named_mod.copy_into,
            gather._copy_stream,
        )

        def pack(*a, **kw):
            self.packs += 1
            return real_pack(*a, **kw)

        def copy_into(dst, t):
            self.per_tensor += 1
            return real_copy_into(dst, t)

        def stream(device):
            self.streams.append(real_stream(device))
            return self.streams[-1]

        monkeypatch.setattr(gather, "pack", pack)
        monkeypatch.setattr(named_mod, "copy_into", copy_into)
        monkeypatch.setattr(gather, "_copy_stream", stream)


def train_step(weights: dict[str, torch.Tensor]) -> None:
    """Every byte of every device tensor changed, queued behind a spin kernel of about 0.1 s on
    the current stream: the trainer's step, still running when the registration is called."""
    torch.cuda._sleep(200_000_000)
    bases = {}
    for t in weights.values():
        if t.is_cuda and t.nbytes:
            base = t if t._base is None else t._base
            bases[base.data_ptr()] = base
    with torch.no_grad():
        for base in bases.values():
            base.view(_INT[base.dtype.itemsize]).bitwise_not_()


@pytest.mark.gpu
def test_gpu_registration_bit_exact_producers_queued(tmp_path, monkeypatch):
    """Three steps, the later two registered while the step's new bytes are still queued:
    every byte of every tensor exact in the host buffers (read once the step ran: a copy not
    ordered after it would hold the old bytes); the small device tensors packed in hundreds of
    segments (4 KiB each), the large, host-held and lone ones copied one by one; the copy
    stream idle on return."""
    monkeypatch.setattr(gather, "STAGING_BYTES", 4096)
    watch = Watch(monkeypatch)
    weights = gpu_weights(seed=3)
    alone = 2 + lone(weights, 4096)  # per step (the host-held ones: memcpy, not torch)
    reg = registry(tmp_path)
    try:
        for step in range(3):
            if step:
                train_step(weights)
            packs, per_tensor = watch.packs, watch.per_tensor
            ckpt = reg.register(f"step{step}", named_tensors=weights)
            assert watch.streams and all(s.query() for s in watch.streams)
            got = {n: raw(ckpt.get_tensor(n)) for n in weights}
            assert got == {n: raw(t) for n, t in weights.items()}
            assert watch.packs - packs > 100 and watch.per_tensor - per_tensor == alone
            reg.unregister(f"step{step}")
    finally:
        reg.close()


@pytest.mark.gpu
def test_gpu_failure_midway_leaves_no_copy_running(tmp_path, monkeypatch):
    """A failure right after a copy to host was queued behind a spin kernel: the
    CheckpointError raised once the copy stream is idle, nothing registered; the next
    registration exact."""
    monkeypatch.setattr(gather, "STAGING_BYTES", 4096)
    watch = Watch(monkeypatch)
    weights = gpu_weights(seed=4)
    real_event, made = torch.cuda.Event, []

    def event(*args, **kwargs):  # per segment: packed (current stream), done (copy stream)
        made.append(1)
        if len(made) == 39:  # segment 20 packed after a spin: its copy waits behind it
            torch.cuda._sleep(200_000_000)
        if len(made) == 40:  # and fails once queued
            raise CheckpointError("injected")
        return real_event(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "Event", event)
    reg = registry(tmp_path)
    try:
        with pytest.raises(CheckpointError, match="injected"):
            reg.register("bad", named_tensors=weights)
        assert watch.streams and all(s.query() for s in watch.streams)
        assert reg.names() == []
        monkeypatch.setattr(torch.cuda, "Event", real_event)
        ckpt = reg.register("good", named_tensors=weights)
        assert {n: raw(ckpt.get_tensor(n)) for n in weights} == {
            n: raw(t) for n, t in weights.items()
        }
    finally:
        reg.close()


@pytest.mark.gpu
def test_gpu_few_tensors_are_copied_one_by_one(tmp_path, monkeypatch):
    watch = Watch(monkeypatch)
    weights = {f"w{i}": torch.randn(10, device="cuda") for i in range(gather.MIN_TENSORS - 1)}
    reg = registry(tmp_path)
    try:
        ckpt = reg.register("few", named_tensors=weights)
        assert {n: raw(ckpt.get_tensor(n)) for n in weights} == {
            n: raw(t) for n, t in weights.items()
        }
        assert watch.packs == 0 and watch.per_tensor == len(weights)
    finally:
        reg.close()
