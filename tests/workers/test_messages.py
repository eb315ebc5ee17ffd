"""Typed records between the front and the ranks: round trips and every way a frame is refused."""

from __future__ import annotations

import json

import pytest

from workers.errors import ProtocolError
from workers.server import messages as m


@pytest.mark.parametrize(
    "msg",
    [
        m.Call(seq=1, method="generate", args=[], kwargs={"input_ids": [1, 2]}),
        m.Shutdown(),
        m.Ready(rank=1, device="cuda:1", parameter_bytes=123),
        m.StartupFailed(rank=0, error="MissingWeightsError: ..."),
        m.Reply(seq=2, rank=0, value={"output_ids": [3]}),
        m.Reply(seq=2, rank=1, value=None),
        m.Failure(seq=3, rank=1, error="boom", weights_modified=True),
    ],
)
def test_round_trip(msg):
    assert m.decode(m.encode(msg)) == msg


def _frame(**fields) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    "frame, message",
    [
        (b"\xff", "not JSON"),
        (b"[1]", "not a JSON object"),
        (_frame(v=2, type="Shutdown"), "version"),
        (_frame(type="Shutdown"), "version"),
        (_frame(v=1, type="Exec"), "unknown message type"),
        (_frame(v=1, type="Ready", rank=0, device="cpu"), "fields"),
        (_frame(v=1, type="Ready", rank=0, device="cpu", parameter_bytes=1, x=1), "fields"),
        (_frame(v=1, type="Ready", rank="0", device="cpu", parameter_bytes=1), "rank"),
        (_frame(v=1, type="Reply", seq=True, rank=0, value=1), "seq"),
        (b" " * (m.MAX_FRAME_BYTES + 1), "exceeds"),
    ],
)
def test_bad_frames_are_refused(frame, message):
    with pytest.raises(ProtocolError, match=message):
        m.decode(frame)


def test_oversized_message_is_refused_on_encode():
    with pytest.raises(ProtocolError, match="exceeds"):
        m.encode(m.Reply(seq=1, rank=0, value="x" * m.MAX_FRAME_BYTES))


@pytest.mark.parametrize("depth", [500, 20_000])
def test_a_frame_nested_deeper_than_the_parser_allows_is_a_protocol_error(depth):
    deep = "[" * depth + "]" * depth
    frame = f'{{"v": 1, "type": "Call", "seq": 1, "method": "x", "args": {deep}, "kwargs": {{}}}}'
    if depth < 1000:  # parsed: the fields are checked at their types, never walked
        assert m.decode(frame.encode()).args == json.loads(deep)
    else:
        with pytest.raises(ProtocolError, match=r"^frame: JSON nested deeper than the JSON pars"):
            m.decode(frame.encode())
