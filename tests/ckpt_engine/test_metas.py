import json

import pytest

from ckpt_engine.errors import MetasError
from ckpt_engine.metas import CheckpointMetas, RankMetas, TensorMeta


def t(name, dtype="F32", shape=(2,), buffer=0, offset=0):
    from ckpt_engine import dtypes

    return TensorMeta(
        name=name,
        dtype=dtype,
        shape=shape,
        nbytes=dtypes.nbytes_of(dtype, shape),
        buffer=buffer,
        offset=offset,
    )


def sample() -> CheckpointMetas:
    r0 = RankMetas(
        rank=0,
        device_key="CPU-h-0",
        host="h",
        buffer_bytes=(64,),
        tensors=(t("a"), t("b", "BF16", (3, 2), offset=16), t("s", "I8", ())),
    )
    r1 = RankMetas(
        rank=1,
        device_key="CPU-h-1",
        host="h",
        buffer_bytes=(8, 0),
        tensors=(t("c", "BOOL", (0, 4)), t("d", "U8", (8,))),
    )
    return CheckpointMetas(name="ckpt", ranks=(r0, r1))


def test_round_trip_through_a_json_file(tmp_path):
    metas = sample()
    path = tmp_path / "metas.json"
    metas.save(path)
    doc = json.loads(path.read_text())  # plain JSON, no pickle
    assert doc["format"] == "ckpt-engine-metas" and doc["version"] == 2
    assert doc["ranks"][0]["tensors"]["names"] == ["a", "b", "s"]  # columns
    loaded = CheckpointMetas.load(path)
    assert loaded == metas
    assert loaded.num_tensors == 5 and loaded.world_size == 2
    assert loaded.owner_of("d") == 1


def test_duplicate_name_across_ranks_names_both():
    r0 = RankMetas(rank=0, device_key="k0", host="h", buffer_bytes=(8,), tensors=(t("w"),))
    r1 = RankMetas(rank=1, device_key="k1", host="h", buffer_bytes=(8,), tensors=(t("w"),))
    with pytest.raises(MetasError, match="'w' is held by ranks 0 and 1"):
        CheckpointMetas(name="x", ranks=(r0, r1))


def test_ranks_must_be_in_order():
    r1 = RankMetas(rank=1, device_key="k1", host="h", buffer_bytes=(), tensors=())
    with pytest.raises(MetasError, match="entry 0 is for rank 1"):
        CheckpointMetas(name="x", ranks=(r1,))


def v1_document(metas: CheckpointMetas) -> dict:
    """The version 1 layout (a record per tensor), which still loads."""
    doc = json.loads(metas.dumps())
    doc["version"] = 1
    for rank, r in zip(doc["ranks"], metas.ranks):
        rank["tensors"] = [
            {
                "name": x.name,
                "dtype": x.dtype,
                "shape": list(x.shape),
                "nbytes": x.nbytes,
                "buffer": x.buffer,
                "offset": x.offset,
            }
            for x in r.tensors
        ]
    return doc


def test_version_1_documents_still_load():
    assert CheckpointMetas.loads(json.dumps(v1_document(sample()))) == sample()


def mutate(doc, path, value):
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (("format",), "pickle", "not a ckpt-engine-metas"),
        (("version",), 3, "version 3"),
        (("checkpoint",), KeyError, "missing field 'checkpoint'"),
        (("ranks", 0, "tensors", 0, "dtype"), "F4", "unknown dtype"),
        (("ranks", 0, "tensors", 0, "nbytes"), 7, "disagrees"),
        (("ranks", 0, "tensors", 0, "nbytes"), True, "type bool"),
        (("ranks", 0, "tensors", 0, "offset"), 60, "exceed its buffer"),
        (("ranks", 0, "tensors", 0, "buffer"), 3, "does not exist"),
        (("ranks", 0, "tensors", 0, "shape"), [-1], "non-negative"),
        (("ranks", 0, "buffer_bytes"), "64", "type str"),
        (("ranks", 1, "rank"), 0, "entry 1 is for rank 0"),
    ],
)
def test_malformed_version_1_documents_are_rejected(path, value, problem):
    doc = mutate(v1_document(sample()), path, value)
    with pytest.raises(MetasError, match=problem):
        CheckpointMetas.loads(json.dumps(doc))


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (("dtypes", 1), "F4", "unknown dtype 'F4'"),
        (("shapes", 1), [3, -2], "shape"),
        (("shapes", 1), [3, 2.0], "shape"),
        (("shapes", 1), [True, 2], "shape"),
        (("shapes", 1), 6, "every element of 'shapes' must be a list"),
        (("names", 0), 5, "every element of 'names' must be a str"),
        (("buffers", 0), True, "every element of 'buffers' must be a int"),
        (("offsets", 1), -16, "negative"),
        (("offsets", 1), 60, "tensor 'b': bytes \\[60, \\+12\\) are outside its buffer 0"),
        (("buffers", 1), 3, "tensor 'b'.* outside its buffer 3"),
        (("names",), ["a", "b"], "differ in length"),
        (("offsets",), KeyError, "missing field 'offsets'"),
    ],
)
def test_malformed_columns_are_rejected(path, value, problem):
    doc = json.loads(sample().dumps())
    mutate(doc["ranks"][0]["tensors"], path, value)
    with pytest.raises(MetasError, match=problem):
        CheckpointMetas.loads(json.dumps(doc))


def test_zero_size_tensors_need_no_buffer():
    doc = json.loads(sample().dumps())
    doc["ranks"][1]["tensors"]["buffers"][0] = 9  # "c" has no bytes
    assert CheckpointMetas.loads(json.dumps(doc)).ranks[1].tensors[0].buffer == 9


def test_not_json_and_missing_file(tmp_path):
    with pytest.raises(MetasError, match="not valid JSON"):
        CheckpointMetas.loads(b"\x80\x04pickle")
    with pytest.raises(MetasError, match="cannot read"):
        CheckpointMetas.load(tmp_path / "none.json")
