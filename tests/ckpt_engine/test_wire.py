import dataclasses
import json

import pytest

from ckpt_engine import wire
from ckpt_engine.errors import ProtocolError

CUDA = wire.CudaBuffer(
    nbytes=1024,
    handle=b"\x00\x01handle\xff",
    storage_size_bytes=2048,
    storage_offset_bytes=512,
    ref_counter_handle=b"/torch_123",
    ref_counter_offset=8,
    event_handle=b"\x02" * 64,
    event_sync_required=True,
)
SHM = wire.ShmBuffer(path="/dev/shm/ckpt-engine-x", nbytes=4096)
MESSAGES = [
    wire.Plan(
        update_id="u1",
        rank=3,
        device_key="GPU-abc",
        buffer=CUDA,
        num_slots=2,
        slot_bytes=512,
        num_buckets=2,
        recv_timeout_s=12.5,
        manifest=wire.Manifest(("a", "s", "e"), ("BF16", "F32", "F8_E4M3"), ((2, 3), (), (4, 0))),
        layout=wire.Layout(counts=(1, 2), offsets=(0, 0, 256)),
    ),
    wire.Plan(
        update_id="u1",
        rank=0,
        device_key="CPU-h-0",
        buffer=SHM,
        num_slots=2,
        slot_bytes=2048,
        num_buckets=0,
        recv_timeout_s=1,
        manifest=wire.Manifest((), (), ()),
        layout=wire.Layout((), ()),
    ),
    wire.Bucket(update_id="u1", id=4, slot=0),
    wire.Done(update_id="u1"),
    wire.Commit(update_id="u1"),
    wire.Abort(update_id="u1", reason="rank 2 failed"),
    wire.Ack(update_id="u1", of="bucket", id=4),
    wire.Ack(update_id="u1", of="plan"),
    wire.Error(update_id="u1", stage="bucket", bucket=4, message="ValueError: x", traceback="tb"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.TYPE)
def test_round_trip(msg):
    data = wire.encode(msg)
    doc = json.loads(data)
    assert doc["v"] == wire.VERSION and doc["type"] == msg.TYPE
    decoded = wire.decode(data)
    assert decoded == msg and type(decoded) is type(msg)


def frame(**overrides):
    doc = json.loads(wire.encode(MESSAGES[0]))
    for key, value in overrides.items():
        if value is KeyError:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def manifest_frame(**overrides):
    doc = json.loads(wire.encode(MESSAGES[0]))
    for key, value in overrides.items():
        target = doc["layout"] if key in ("counts", "offsets") else doc["manifest"]
        target[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x80\x04\x95pickle", "not JSON"),
        (b"[1]", "expected an object"),
        (frame(v=1), "version 1"),
        (frame(v=3), "version 3"),
        (frame(v=KeyError), "version None"),
        (frame(type="exec"), "unknown message type 'exec'"),
        (frame(rank=KeyError), "missing field 'rank'"),
        (frame(rank=True), "'rank' must be a non-negative integer"),
        (frame(rank=-1), "'rank' must be a non-negative integer"),
        (frame(recv_timeout_s=0), "positive number"),
        (frame(update_id=7), "'update_id' must be a string"),
        (frame(manifest=[]), "expected an object"),
        (frame(layout=KeyError), "missing field 'layout'"),
        (frame(buffer={"kind": "pickle"}), "unknown buffer kind"),
        (
            frame(buffer={**json.loads(wire.encode(MESSAGES[0]))["buffer"], "handle": "!!"}),
            "base64",
        ),
        (manifest_frame(dtypes=["BF16", "F4", "F32"]), "unknown dtype 'F4'"),
        (manifest_frame(shapes=[[2.5], [], [1]]), "shape"),
        (manifest_frame(shapes=[[True], [], [1]]), "shape"),
        (manifest_frame(shapes=[[-1], [], [1]]), "shape"),
        (manifest_frame(shapes=[3, [], [1]]), "every element of 'shapes' must be a list"),
        (manifest_frame(names=["a", 1, "e"]), "every element of 'names' must be a str"),
        (manifest_frame(names=["a", "s"]), "differ in length"),
        (manifest_frame(counts=[1, 1]), "do not match 2 buckets and 3 manifest tensors"),
        (manifest_frame(counts=[3]), "do not match 2 buckets"),
        (manifest_frame(offsets=[0, 0]), "2 offsets for 3 manifest tensors"),
        (manifest_frame(offsets=[0, -8, 0]), "negative"),
        (
            json.dumps(
                {"v": wire.VERSION, "type": "ack", "update_id": "u", "of": "everything", "id": None}
            ).encode(),
            "unknown stage",
        ),
    ],
)
def test_malformed_frames(data, problem):
    with pytest.raises(ProtocolError, match=problem):
        wire.decode(data)


def test_columns_are_encoded_once_and_spliced():
    plan = MESSAGES[0]
    first = wire.encode(plan)
    assert plan.manifest.json in first.decode() and wire.encode(plan) == first
    assert plan.manifest.specs() == [
        wire.TensorSpec("a", "BF16", (2, 3)),
        wire.TensorSpec("s", "F32", ()),
        wire.TensorSpec("e", "F8_E4M3", (4, 0)),
    ]
    assert wire.Manifest.of(plan.manifest.specs()) == plan.manifest


def test_size_cap_both_ways():
    big = wire.Abort(update_id="u", reason="x" * 10_000)
    with pytest.raises(ProtocolError, match="exceeds the cap"):
        wire.encode(big, max_bytes=4096)
    with pytest.raises(ProtocolError, match="exceeds the cap"):
        wire.decode(wire.encode(big), max_bytes=4096)


def test_plan_in_two_frames_reuses_a_repeated_columns_frame():
    plan = MESSAGES[0]
    frames = wire.encode_frames(plan)
    assert len(frames) == 2 and b"manifest" not in frames[0]
    first = wire.decode_frames(frames)
    assert first == plan
    again = wire.decode_frames([frames[0], bytes(frames[1])])  # equal bytes, another object
    assert again.manifest is first.manifest and again.layout is first.layout
    other = dataclasses.replace(
        plan, manifest=dataclasses.replace(plan.manifest, names=("x", "s", "e"))
    )
    changed = wire.decode_frames(wire.encode_frames(other))
    assert changed.manifest.names == ("x", "s", "e") and changed.manifest is not first.manifest
    assert [len(f) for f in wire.encode_frames(MESSAGES[2])] == [len(wire.encode(MESSAGES[2]))]


@pytest.mark.parametrize(
    ("frames", "problem"),
    [
        (lambda f: [f[0], b"{not json"], "columns frame is not JSON"),
        (lambda f: [f[0], b'{"manifest": {}}'], "missing field 'names'"),
        (lambda f: [f[0], f[1], f[1]], "plan message of 3 frames"),
        (lambda f: [wire.encode(wire.Done("u")), f[1]], "done message of 2 frames"),
        (lambda f: [f[0].replace(b'"next-frame"', b'"inline"'), f[1]], "of 2 frames"),
    ],
)
def test_malformed_plan_frames(frames, problem):
    with pytest.raises(ProtocolError, match=problem):
        wire.decode_frames(frames(wire.encode_frames(MESSAGES[0])))


def test_two_frame_size_cap():
    frames = wire.encode_frames(MESSAGES[0])
    cap = sum(map(len, frames)) - 1
    with pytest.raises(ProtocolError, match="exceeds the cap"):
        wire.encode_frames(MESSAGES[0], max_bytes=cap)
    with pytest.raises(ProtocolError, match="exceeds the cap"):
        wire.decode_frames(frames, max_bytes=cap)
