"""Every kernel in the op table against ONNX Runtime running the same single-op graph."""

import numpy as np
import pytest

from gpu_mdf.engine.ops import OPS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

R = np.random.default_rng(0)


def f32(*shape):
    return R.standard_normal(shape).astype(np.float32)


def run_onnx(op, inputs: dict, attrs: dict, opset=17, out_type=TensorProto.FLOAT):
    names = list(inputs)
    nodes = [helper.make_node(op, names, ["out"], **attrs)]
    vi = []
    for n, v in inputs.items():
        dt = {np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL}.get(
            v.dtype, TensorProto.FLOAT)
        vi.append(helper.make_tensor_value_info(n, dt, v.shape))
    out = helper.make_tensor_value_info("out", out_type, None)
    g = helper.make_graph(nodes, "g", vi, [out])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0]


def ours(op, inputs: dict, attrs: dict):
    spec = OPS[f"onnx::{op}"]
    kw = {**spec.attrs, **attrs}
    if spec.variadic:
        return spec.kernel(np, *inputs.values(), **kw)
    order = list(spec.inputs) + list(spec.optional)
    pos = [inputs.get(n) for n in order[:max(order.index(k) for k in inputs) + 1]]
    return spec.kernel(np, *pos, **kw)


x4 = f32(2, 3, 9, 8)
CASES = [
    ("Relu", {"X": f32(4, 5)}, {}), ("Sigmoid", {"X": f32(4, 5) * 20}, {}),
    ("Tanh", {"input": f32(4, 5)}, {}), ("Exp", {"input": f32(4, 5)}, {}),
    ("Log", {"input": np.abs(f32(4, 5)) + 0.1}, {}), ("Sqrt", {"X": np.abs(f32(4, 5))}, {}),
    ("Abs", {"X": f32(3)}, {}), ("Neg", {"X": f32(3)}, {}), ("Erf", {"input": f32(4, 5)}, {}),
    ("Softplus", {"X": f32(4, 5) * 10}, {}), ("Softsign", {"input": f32(4, 5)}, {}),
    ("Elu", {"X": f32(4, 5)}, {"alpha": 0.7}), ("Selu", {"X": f32(4, 5)}, {}),
    ("LeakyRelu", {"X": f32(4, 5)}, {"alpha": 0.3}),
    ("HardSigmoid", {"X": f32(4, 5) * 4}, {"alpha": 1 / 6, "beta": 0.5}),
    ("Clip", {"input": f32(4, 5) * 5, "min": np.array(0, np.float32), "max": np.array(6, np.float32)}, {}),
    ("Identity", {"input": f32(3, 2)}, {}),
    ("Add", {"A": f32(4, 5), "B": f32(5)}, {}), ("Sub", {"A": f32(4, 5), "B": f32(4, 5)}, {}),
    ("Mul", {"A": f32(4, 5), "B": f32(1, 5)}, {}), ("Div", {"A": f32(4, 5), "B": f32(5) + 3}, {}),
    ("Sum", {"a": f32(3, 2), "b": f32(3, 2), "c": f32(3, 2)}, {}),
    ("Max", {"a": f32(3, 2), "b": f32(3, 2)}, {}), ("Min", {"a": f32(3, 2), "b": f32(3, 2)}, {}),
    ("Mean", {"a": f32(3, 2), "b": f32(3, 2), "c": f32(3, 2)}, {}),
    ("MatMul", {"A": f32(2, 4, 5), "B": f32(5, 3)}, {}),
    ("Gemm", {"A": f32(4, 5), "B": f32(3, 5), "C": f32(3)}, {"transB": 1, "alpha": 0.5}),
    ("Softmax", {"input": f32(4, 5) * 5}, {"axis": -1}), ("Softmax", {"input": f32(2, 4, 5)}, {"axis": 1}),
    ("LogSoftmax", {"input": f32(4, 5) * 5}, {"axis": -1}),
    ("BatchNormalization", {"X": x4, "scale": f32(3), "B": f32(3), "input_mean": f32(3),
                            "input_var": np.abs(f32(3)) + 0.5}, {"epsilon": 1e-3}),
    ("LayerNormalization", {"X": f32(2, 3, 4), "Scale": f32(4), "B": f32(4)}, {"axis": -1, "epsilon": 1e-3}),
    ("LayerNormalization", {"X": f32(2, 3, 4), "Scale": f32(3, 4)}, {"axis": 1}),
    ("Flatten", {"input": x4}, {"axis": 1}),
    ("Reshape", {"data": x4, "shape": np.array([0, -1, 4], np.int64)}, {}),
    ("Transpose", {"data": x4}, {"perm": [0, 2, 3, 1]}),
    ("Concat", {"a": f32(2, 3), "b": f32(2, 4)}, {"axis": 1}),
    ("Pad", {"data": x4, "pads": np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64)}, {}),
    ("Slice", {"data": x4, "starts": np.array([1, 2], np.int64), "ends": np.array([8, 7], np.int64),
               "axes": np.array([2, 3], np.int64)}, {}),
    ("GlobalAveragePool", {"X": x4}, {}), ("GlobalMaxPool", {"X": x4}, {}),
    ("ReduceMean", {"data": x4}, {"axes": [2, 3], "keepdims": 0}),
    ("ReduceMax", {"data": x4}, {"axes": [1], "keepdims": 1}),
    ("MaxPool", {"X": x4}, {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 1, 1]}),
    ("MaxPool", {"X": f32(2, 3, 10)}, {"kernel_shape": [3], "strides": [2]}),
    ("AveragePool", {"X": x4}, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                "count_include_pad": 0}),
    ("AveragePool", {"X": x4}, {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("Expand", {"input": f32(2, 1, 3, 1), "shape": np.array([1, 4, 1, 5], np.int64)}, {}),
    ("Where", {"condition": f32(4, 5) > 0, "X": f32(4, 5), "Y": f32(5)}, {}),
    ("Conv", {"X": x4, "W": f32(4, 3, 3, 3), "B": f32(4)}, {"pads": [1, 1, 1, 1]}),
    ("Conv", {"X": x4, "W": f32(6, 1, 3, 2)}, {"group": 3, "strides": [2, 1], "dilations": [2, 1],
                                                "pads": [0, 1, 2, 0]}),
    ("Conv", {"X": f32(2, 4, 11), "W": f32(6, 2, 3), "B": f32(6)}, {"group": 2, "dilations": [2]}),
]


@pytest.mark.parametrize("op,inputs,attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_kernel_matches_onnxruntime(op, inputs, attrs):
    want = run_onnx(op, inputs, attrs)
    got = ours(op, inputs, attrs)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_resize_nearest_integer_scales():
    x = f32(1, 2, 3, 4)
    want = run_onnx("Resize", {"X": x, "roi": np.zeros(0, np.float32),
                               "scales": np.array([1, 1, 2, 3], np.float32)},
                    {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                     "nearest_mode": "floor"})
    got = OPS["onnx::Resize"].kernel(np, x, None, np.array([1, 1, 2, 3], np.float32))
    np.testing.assert_array_equal(got, want)


def test_greater_or_equal():
    a, b = f32(4, 5), f32(5)
    want = run_onnx("GreaterOrEqual", {"A": a, "B": b}, {}, out_type=TensorProto.BOOL)
    np.testing.assert_array_equal(OPS["onnx::GreaterOrEqual"].kernel(np, a, b), want)


def test_dropout_is_identity_at_inference():
    x = f32(4, 4)
    assert OPS["onnx::Dropout"].kernel(np, x, 0.5) is x


def test_every_kernel_is_covered():
    tested = {f"onnx::{c[0]}" for c in CASES} | {"onnx::Resize", "onnx::Dropout", "onnx::GreaterOrEqual"}
    untested_onnx = {k for k in OPS if k.startswith("onnx::")} - tested
    # the remaining ops are trivial wrappers of one NumPy function
    assert untested_onnx <= {"onnx::Floor", "onnx::Ceil", "onnx::Reciprocal", "onnx::Sin", "onnx::Cos",
                             "onnx::Pow", "onnx::Cast"}


@pytest.mark.parametrize("name", ["linear", "logistic", "exponential", "sin", "cos", "tan", "sinh", "cosh",
                                  "tanh", "arctan", "arcsin", "arccos", "MatMul", "Relu"])
def test_mdf_standard_functions_match_modeci(name):
    """Same formulas as modeci_mdf.functions.standard (their own Python versions)."""
    standard = pytest.importorskip("modeci_mdf.functions.standard")
    ref = standard.mdf_functions[name]
    args = {a: (R.random((3, 4)) * 0.9 if a in ("variable0", "A") else
                R.random((4, 2)) if a == "B" else float(R.random() + 0.5)) for a in ref["arguments"]}
    spec = OPS[name]
    assert list(spec.inputs) == list(ref["arguments"])
    got = spec.kernel(np, *(args[a] for a in spec.inputs))
    np.testing.assert_allclose(got, ref["function"](**args), rtol=1e-12)
