import pytest
import torch

from ckpt_engine import dtypes

REQUIRED = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@pytest.mark.parametrize(("name", "dtype"), sorted(REQUIRED.items()))
def test_required_dtypes_map_both_ways(name, dtype):
    assert dtypes.to_torch(name) == dtype
    assert dtypes.from_torch(dtype) == name
    assert dtypes.itemsize(name) == dtype.itemsize


@pytest.mark.parametrize("name", dtypes.SUPPORTED)
def test_every_supported_dtype_round_trips(name):
    assert dtypes.from_torch(dtypes.to_torch(name)) == name


@pytest.mark.parametrize(
    ("name", "shape", "nbytes"),
    [("F32", (), 4), ("BF16", (0, 7), 0), ("I64", (2, 3), 48), ("BOOL", (5,), 5)],
)
def test_nbytes_of(name, shape, nbytes):
    assert dtypes.nbytes_of(name, shape) == nbytes


@pytest.mark.parametrize("name", ["F4", "bf16", "", "F128", None])
def test_unknown_dtype_lists_supported(name):
    with pytest.raises(ValueError, match=r"supported: .*BF16"):
        dtypes.to_torch(name)


def test_unstorable_torch_dtype():
    with pytest.raises(ValueError, match="cannot be stored"):
        dtypes.from_torch(torch.complex128)
