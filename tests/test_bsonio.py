"""gpu_mdf.mdf.bson: the same bytes as pymongo's bson, float arrays as NumPy, bad data refused."""

import math

import numpy as np
import pytest

from gpu_mdf.mdf import bson as bsonio
from gpu_mdf.mdf.bson import BSONError

bson = pytest.importorskip("bson")    # pymongo's, the reference (modeci_mdf reads .bson with it)
R = np.random.default_rng(0)


def as_python(v):
    """What pymongo is given for the same document: float arrays as lists of doubles."""
    if isinstance(v, dict):
        return {k: as_python(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return v.astype(np.float64).tolist() if v.dtype.kind == "f" else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [as_python(x) for x in v]
    return v


def same(a, b):
    """Decoded by bsonio (arrays) vs by pymongo (lists)."""
    if isinstance(a, np.ndarray):
        assert a.dtype == np.float64
        np.testing.assert_array_equal(a, np.asarray(b, np.float64))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    elif isinstance(a, int) and not isinstance(a, bool):
        assert isinstance(b, int) and a == b      # pymongo gives its Int64 for 64-bit integers
    else:
        assert type(a) is type(b) and (a == b or (a != a and b != b)), (a, b)


# sizes around each key-length boundary: 1-digit keys end at 9, 2-digit at 99, 3-digit at 999
SHAPES = [(1,), (9,), (10,), (11,), (99,), (100,), (101,), (1000,), (12345,), (3, 4), (10, 11), (2, 101, 3),
          (3, 3, 2, 11), (0,), (2, 0), (1, 1, 1, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_arrays_are_pymongos_bytes_and_read_back(shape, dtype):
    a = (R.standard_normal(shape) * 10.0 ** R.integers(-5, 5, shape)).astype(dtype)
    doc = {"w": a, "after": 1}
    data = bsonio.encode(doc)
    assert data == bson.encode(as_python(doc))
    back = bsonio.decode(data)
    same(back, bson.decode(data))
    if a.size:
        assert isinstance(back["w"], np.ndarray) and back["w"].shape == shape
        np.testing.assert_array_equal(back["w"].astype(dtype), a)


def test_a_whole_mdf_like_document():
    doc = {"m": {"format": "ModECI MDF v0.4", "graphs": {"g": {
        "nodes": {"n/1": {"input_ports": {"x": {"shape": [1, 28, 28], "type": "float32"}},
                          "parameters": {"k": {"value": R.standard_normal((5, 3, 3, 2)).astype(np.float32)},
                                         "s": {"value": np.float32(0.1)}, "i": {"value": np.int64(2 ** 40)},
                                         "perm": {"value": [0, 3, 1, 2]}, "flag": {"value": True},
                                         "none": {"value": None}, "mixed": {"value": [1, 2.5, "x", [1, [2]]]},
                                         "special": {"value": np.array([np.nan, np.inf, -np.inf, -0.0, 5e-324])},
                                         "ints": {"value": np.arange(20, dtype=np.int32)},
                                         "ragged": {"value": [[1.0, 2.0], [3.0]]},
                                         "unicode": {"value": "µ-naïve ✓"}}}},
        "edges": {}}}}}
    data = bsonio.encode(doc)
    assert data == bson.encode(as_python(doc))
    back = bsonio.decode(data)
    same(back, bson.decode(data))
    p = back["m"]["graphs"]["g"]["nodes"]["n/1"]["parameters"]
    assert isinstance(p["ragged"]["value"], list) and p["mixed"]["value"] == [1, 2.5, "x", [1, [2]]]
    assert isinstance(p["k"]["value"], np.ndarray) and p["ints"]["value"] == list(range(20))
    assert p["i"]["value"] == 2 ** 40 and p["flag"]["value"] is True and p["none"]["value"] is None
    assert math.copysign(1, p["special"]["value"][3]) == -1 and p["special"]["value"][4] == 5e-324


def test_a_pymongo_written_file_with_a_ragged_inner_array_reads_element_by_element():
    data = bson.encode({"a": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0]], "b": [[1.0, 2.0], [3, 4]]})
    back = bsonio.decode(data)
    assert isinstance(back["a"], list) and isinstance(back["b"][1], list)
    same(back, bson.decode(data))


@pytest.mark.parametrize("data,match", [
    (b"", "runs past"),
    (b"\x05\x00\x00", "runs past"),
    (bson.encode({"a": 1.0})[:-1], "impossible length"),
    (bson.encode({"a": 1.0}) + b"\x00", "bytes after"),
    (bson.encode({"a": 1.0}).replace(b"\x01a", b"\x07a"), "type 0x07"),
    (bson.encode({"a": "xyz"}).replace(b"\x04\x00\x00\x00xyz", b"\x09\x00\x00\x00xyz"), "string"),
    ((lambda d: d[:7] + (d[7] + 8).to_bytes(1, "little") + d[8:])(bson.encode({"a": [1.0, 2.0]})),
     "impossible length"),
    (bson.encode({"é": 1}).replace("é".encode(), b"\xff\xfe"), "UTF-8"),
])
def test_malformed_data_is_refused_with_the_reason(data, match):
    with pytest.raises(BSONError, match=match):
        bsonio.decode(data)


def test_values_mdf_cannot_hold_are_refused():
    with pytest.raises(BSONError, match="complex"):
        bsonio.encode({"a": np.zeros(3, np.complex64)})
    with pytest.raises(BSONError, match="64 bits"):
        bsonio.encode({"a": 2 ** 70})
    with pytest.raises(BSONError, match="keys are strings"):
        bsonio.encode({1: 2})
    with pytest.raises(BSONError, match="set"):
        bsonio.encode({"a": {1, 2}})
