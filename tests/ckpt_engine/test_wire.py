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
        manifest=(wire.TensorSpec("a", "BF16", (2, 3)), wire.TensorSpec("s", "F32", ())),
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
        manifest=(),
    ),
    wire.Bucket(
        update_id="u1", id=4, slot=0, tensors=(wire.TensorSlot("a", "F8_E4M3", (4, 0), 256, 0),)
    ),
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


def bucket_frame(tensor):
    return json.dumps(
        {"v": 1, "type": "bucket", "update_id": "u", "id": 0, "slot": 0, "tensors": [tensor]}
    ).encode()


GOOD_SLOT = {"name": "a", "dtype": "F32", "shape": [2], "offset": 0, "nbytes": 8}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x80\x04\x95pickle", "not JSON"),
        (b"[1]", "expected an object"),
        (frame(v=2), "version 2"),
        (frame(v=KeyError), "version None"),
        (frame(type="exec"), "unknown message type 'exec'"),
        (frame(rank=KeyError), "missing field 'rank'"),
        (frame(rank=True), "'rank' must be a non-negative integer"),
        (frame(rank=-1), "'rank' must be a non-negative integer"),
        (frame(recv_timeout_s=0), "positive number"),
        (frame(update_id=7), "'update_id' must be a string"),
        (frame(manifest={}), "'manifest' must be a list"),
        (frame(buffer={"kind": "pickle"}), "unknown buffer kind"),
        (
            frame(buffer={**json.loads(wire.encode(MESSAGES[0]))["buffer"], "handle": "!!"}),
            "base64",
        ),
        (bucket_frame({**GOOD_SLOT, "dtype": "F4"}), "unknown dtype"),
        (bucket_frame({**GOOD_SLOT, "shape": [2.5]}), "shape"),
        (bucket_frame([1]), "expected an object"),
        (
            json.dumps(
                {"v": 1, "type": "ack", "update_id": "u", "of": "everything", "id": None}
            ).encode(),
            "unknown stage",
        ),
    ],
)
def test_malformed_frames(data, problem):
    with pytest.raises(ProtocolError, match=problem):
        wire.decode(data)


def test_size_cap_both_ways():
    big = wire.Abort(update_id="u", reason="x" * 10_000)
    with pytest.raises(ProtocolError, match="exceeds the cap"):
        wire.encode(big, max_bytes=4096)
    with pytest.raises(ProtocolError, match="exceeds the cap"):
        wire.decode(wire.encode(big), max_bytes=4096)
