"""Faults driven in one process: tampered metas, a flood of refused P2P reads, a garbage first
frame to the worker. They reuse the fixtures and fakes of the ckpt_engine tests."""

from __future__ import annotations

import json
import logging
import time

import pytest
from test_metas import mutate, sample
from test_p2p_transport import TOKEN, _read, served  # noqa: F401 (`served` is a fixture)
from test_worker import FakePS, Worker

from ckpt_engine import CheckpointMetas, UpdateAborted
from ckpt_engine.errors import MetasError, ReadRefused
from ckpt_engine.p2p.transport import ReadRange


@pytest.mark.parametrize(
    "field, value, problem",
    [
        (("offsets", 1), 1 << 40, "outside its buffer"),
        (("dtypes", 1), "PICKLE", "unknown dtype"),
    ],
    ids=["offset", "dtype"],
)
def test_tampered_metas_are_refused_on_load(tmp_path, fault_row, field, value, problem):
    doc = json.loads(sample().dumps())
    mutate(doc["ranks"][0]["tensors"], field, value)
    path = tmp_path / "metas.json"
    path.write_text(json.dumps(doc))
    start = time.monotonic()
    with pytest.raises(MetasError, match=problem) as e:
        CheckpointMetas.load(path)
    fault_row(
        f"metas file tampered: {field[0]} = {str(value)[:16]}",
        "refused on load, naming the file and the tensor",
        "MetasError: " + str(e.value).rsplit(".json: ", 1)[-1][:100],
        time.monotonic() - start,
        5,
    )


def test_a_tampered_p2p_token_is_refused_by_the_owner(served, fault_row, caplog):  # noqa: F811
    server, record, _ = served
    caplog.set_level(logging.WARNING, logger="ckpt_engine.p2p.tcp")
    dst = memoryview(bytearray(16))
    start = time.monotonic()
    with pytest.raises(ReadRefused, match="owner rank 3") as e:
        _read({**record, "token": "f" * len(TOKEN)}, [ReadRange(0, 0, 16, dst)])
    seconds = time.monotonic() - start
    for _ in range(99):
        with pytest.raises(ReadRefused):
            _read({**record, "token": "f" * len(TOKEN)}, [ReadRange(0, 0, 16, dst)])
    warnings = [r for r in caplog.records if "refused a read" in r.getMessage()]
    assert server.refused == 100 and server.served_bytes == 0 and len(warnings) == 1
    fault_row(
        "P2P reads with a tampered token (100 of them)",
        "each refused naming the owner; the owner logs at most one warning per 10 s",
        f"ReadRefused ({e.value.code}) x100; {len(warnings)} warning logged",
        seconds,
        5,
    )


def test_a_garbage_first_frame_aborts_the_worker(tmp_path, fault_row):
    ps = FakePS(tmp_path)
    try:
        worker = Worker(ps.address)
        start = time.monotonic()
        ps.sock.send(b"\x80\x04\x95garbage")
        error = worker.result()
        seconds = time.monotonic() - start
    finally:
        ps.close()
    assert isinstance(error, UpdateAborted) and worker.calls == [], error
    fault_row(
        "a garbage first frame to the worker",
        "UpdateAborted (the documented failure), nothing mapped or written",
        f"{type(error).__name__}: bad first message: {str(error).rsplit(': ', 1)[-1]}",
        seconds,
        5,
    )
