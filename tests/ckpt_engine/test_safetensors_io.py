import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_engine import safetensors_io as sio
from ckpt_engine.errors import CheckpointFileError


def raw_file(path, header, data=b"", *, length=None):
    """Write a safetensors-shaped file from a header (dict or raw bytes) and data bytes."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = struct.pack("<Q", len(body) if length is None else length)
    path.write_bytes(prefix + body + data)
    return str(path)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_parses_a_real_file_like_the_library(tmp_path):
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor(True),
        "c": torch.zeros(0, 5, dtype=torch.bfloat16),
        "d": torch.arange(5, dtype=torch.int8),
    }
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    header = sio.read_header(path)
    by_name = {t.name: t for t in header.tensors}
    assert set(by_name) == set(tensors)
    raw = Path(path).read_bytes()
    for name, tensor in load_file(path).items():
        t = by_name[name]
        assert t.shape == tuple(tensor.shape)
        got = raw[header.data_start + t.begin : header.data_start + t.end]
        assert got == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


BAD_CASES = [
    # (header, data, length override, problem substring)
    (None, b"", None, "truncated"),
    (b"", b"", 0, "header length is 0"),
    ({"x": entry()}, b"\0" * 8, 10**6, "truncated: header claims"),
    ({"x": entry()}, b"", sio.MAX_HEADER_BYTES + 1, "exceeds"),
    (b"\xff\xfe{}", b"", None, "not UTF-8"),
    (b"{not json", b"", None, "invalid JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    ({"x": 5}, b"", None, "not an object"),
    ({"x": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "no dtype"),
    ({"x": entry(dtype="F4")}, b"\0" * 8, None, "unknown dtype 'F4'"),
    ({"x": entry(shape=(-2,))}, b"\0" * 8, None, "shape"),
    ({"x": entry(shape=(True,))}, b"\0" * 8, None, "shape"),
    ({"x": {**entry(), "shape": "2"}}, b"\0" * 8, None, "shape"),
    ({"x": entry(offsets=(0,))}, b"\0" * 8, None, "data_offsets"),
    ({"x": entry(offsets=(8, 0))}, b"\0" * 8, None, "offsets out of range"),
    ({"x": entry(offsets=(0, 8))}, b"\0" * 4, None, "offsets out of range"),
    ({"x": entry(offsets=(0, 12))}, b"\0" * 12, None, "needs 8"),
    ({"x": entry(), "y": entry(offsets=(4, 12))}, b"\0" * 12, None, "overlap"),
    (
        b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
        b'"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        b"\0" * 8,
        None,
        "the same tensor name twice: 'x'",
    ),
    (
        b'{"x": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        b"\0" * 8,
        None,
        "duplicate key 'dtype'",
    ),
    ({"__metadata__": [1], "x": entry()}, b"\0" * 8, None, "__metadata__"),
    (
        b'{"__metadata__": {"k": "a", "k": "b"}, '
        b'"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        b"\0" * 8,
        None,
        "duplicate key 'k'",
    ),
]


@pytest.mark.parametrize(("header", "data", "length", "problem"), BAD_CASES)
def test_bad_files_name_file_and_problem(tmp_path, header, data, length, problem):
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(b"\x01\x02\x03")
        path = str(path)
    else:
        path = raw_file(path, header, data, length=length)
    with pytest.raises(CheckpointFileError, match=problem) as info:
        sio.read_header(path)
    assert info.value.path == path
    assert path in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointFileError, match="cannot read"):
        sio.read_header(str(tmp_path / "nope.safetensors"))


def test_zero_sized_tensors_may_share_offsets(tmp_path):
    header = {
        "e": entry(shape=(0,), offsets=(0, 0)),
        "x": entry(),
        "f": entry(shape=(0,), offsets=(8, 8)),
    }
    h = sio.read_header(raw_file(tmp_path / "z.safetensors", header, b"\0" * 8))
    assert h.data_bytes == 8 and len(h.tensors) == 3


def test_parallel_read_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sio, "READ_CHUNK_BYTES", 1000)
    payload = bytes(range(256)) * 40
    path = tmp_path / "blob"
    path.write_bytes(b"HEAD" + payload)
    dest = bytearray(len(payload))
    sio.read_parallel([sio.ReadJob(str(path), 4, memoryview(dest))], threads=4)
    assert bytes(dest) == payload


def test_read_past_end_is_truncation(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"0123456789")
    dest = bytearray(20)
    with pytest.raises(CheckpointFileError, match="truncated"):
        sio.read_parallel([sio.ReadJob(str(path), 0, memoryview(dest))], threads=2)


def test_column_checks_agree_with_the_per_entry_checks(monkeypatch):
    """Thousands of entries in shuffled order, mixed dtypes, zero-size tensors and metadata:
    the whole-column path gives exactly what the per-entry path gives."""
    import random

    rng = random.Random(7)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for i in range(3000):
        dtype, size = rng.choice([("BF16", 2), ("F32", 4), ("U8", 1)])
        shape = [rng.randint(0, 3), rng.randint(1, 5)] if i % 7 else []
        nbytes = size * (shape[0] * shape[1] if shape else 1)
        header[f"layers.{i}.w"] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    items = list(header.items())
    rng.shuffle(items)
    raw = json.dumps(dict(items)).encode()
    fast = sio.parse_header("f", raw, 8 + len(raw) + offset)
    monkeypatch.setattr(sio, "_fast_entries", lambda pairs, size: None)
    slow = sio.parse_header("f", raw, 8 + len(raw) + offset)
    assert fast == slow and len(fast.tensors) == 3000


@pytest.mark.parametrize(
    "header",
    [
        {
            "__metadata__": {"dtype": 'a "data_offsets" b', "shape": "x"},
            "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        },
        {"dtype": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
        {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}},
    ],
)
def test_unusual_but_valid_headers_still_parse(header):
    """Keys that the column path counts appear elsewhere, or an entry has an extra key: the
    per-entry path takes over and accepts them."""
    raw = json.dumps(header).encode()
    parsed = sio.parse_header("f", raw, 8 + len(raw) + 8)
    assert [(t.begin, t.end) for t in parsed.tensors] == [(0, 8)]
