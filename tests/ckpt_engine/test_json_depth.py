"""Deeply nested JSON from outside the process: every reader answers with its named error, the
limit stated, never a bare RecursionError (json.loads raises one past about 1000 levels) nor a
TypeError from a container where a scalar belongs."""

from __future__ import annotations

import json

import pytest
from test_wire import MESSAGES

from ckpt_engine import json_depth, wire
from ckpt_engine.errors import CheckpointFileError, MetasError, ProtocolError
from ckpt_engine.metas import CheckpointMetas
from ckpt_engine.p2p import protocol
from ckpt_engine.registry.records import RecordError, SourceRecord
from ckpt_engine.safetensors_io import parse_header

PAST_PARSER = 20_000  # json.loads: RecursionError (40 KB: under the P2P header cap)
PAST_LIMIT = 500  # parsed, but past every stated limit


def nested_list(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_value(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value, limit, path",
    [
        (1, 0, None),
        ("[[[", 0, None),
        ([], 1, None),
        ([], 0, ()),
        ([[1]], 2, None),
        ([[1]], 1, (0,)),
        ({"a": {"b": []}}, 2, ("a", "b")),
        ({"a": [1, 2, {"c": 3}]}, 2, ("a", 2)),
        (nested_value(10_000), 64, (0,) * 64),  # no recursion, whatever the depth
    ],
)
def test_too_deep_gives_the_path_to_the_first_container_past_the_limit(value, limit, path):
    assert json_depth.too_deep(value, limit) == path


def test_loads_names_what_where_and_the_limit():
    body = json.dumps({"slices": {"layouts": {"w": nested_value(100)}}})
    with pytest.raises(json_depth.JsonDepthError) as e:
        json_depth.loads(body, what="request body")
    assert str(e.value) == (
        "request body['slices']['layouts']['w'][0][0][0]...: JSON nested deeper than 64 levels"
    )
    with pytest.raises(json_depth.JsonDepthError, match=r"^x: JSON nested deeper than 64 levels"):
        json_depth.loads(nested_list(PAST_PARSER), what="x")
    parser = "JSON nested deeper than the JSON parser's limit"
    with pytest.raises(json_depth.JsonDepthError, match=f"^x: {parser}"):
        json_depth.loads(nested_list(PAST_PARSER), what="x", max_depth=None)
    assert json_depth.loads(nested_list(PAST_LIMIT), what="x", max_depth=None)  # parser only
    assert json_depth.loads('{"a": "[[[[[["}', what="x", max_depth=2) == {"a": "[[[[[["}
    with pytest.raises(json.JSONDecodeError):  # malformed stays json's own error
        json_depth.loads("[1,", what="x")


DEEP = [nested_list(PAST_PARSER).encode(), f'{{"v": {nested_list(PAST_LIMIT)}}}'.encode()]


@pytest.mark.parametrize("data", DEEP, ids=["past-parser", "past-limit"])
def test_every_ckpt_engine_reader_names_its_error(data):
    with pytest.raises(ProtocolError, match=r"nested deeper|version"):
        wire.decode(data)
    with pytest.raises(ProtocolError, match="nested deeper"):
        protocol.decode(data)
    with pytest.raises(MetasError, match=r"nested deeper|metas"):
        CheckpointMetas.loads(data)
    with pytest.raises(RecordError, match="nested deeper"):
        SourceRecord.from_json(data)
    with pytest.raises(CheckpointFileError, match="bad header"):
        parse_header("x.safetensors", data, 8 + len(data) + 16)


@pytest.mark.parametrize(
    "container", [[], {}, nested_value(PAST_LIMIT)], ids=["list", "dict", "deep"]
)
@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.TYPE)
def test_a_container_in_any_wire_field_is_a_protocol_error(msg, container):
    """Every field of every message, and every field of its buffer, replaced by a container:
    ProtocolError naming the message, never a TypeError (unhashable) or a RecursionError."""
    doc = json.loads(wire.encode(msg))
    paths = [(k,) for k in doc] + [
        (k, sub) for k, v in doc.items() if isinstance(v, dict) for sub in v
    ]
    for path in paths:
        bad = json.loads(json.dumps(doc))
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = container
        try:
            wire.decode(json.dumps(bad).encode())
        except ProtocolError:
            continue
        # an empty column or optional record may be valid: then the message decodes
        assert container in ([], {}), path


def test_a_container_in_any_p2p_field_is_a_protocol_error():
    good = json.loads(
        protocol.encode(
            protocol.ReadRequest(id=1, token="0" * 32, checkpoint="c", buffer=0, offset=0, length=8)
        )
    )
    for key in good:
        for container in ([], {}, nested_value(40)):
            with pytest.raises(ProtocolError):
                protocol.decode(json.dumps({**good, key: container}).encode())
