"""Every ONNX kernel, through the whole engine, against ONNX Runtime.

Each case is one ONNX node. ONNX Runtime runs it as an ONNX model; gpu-mdf runs it
as a one-node MDF graph (the first input a port fed at run time, the others
parameters, attributes as function arguments), on NumPy and on the strict CuPy
stand-in, which also proves that the op makes no device->host round trip.
"""

import functools

import numpy as np
import pytest

from gpu_mdf.engine import OPS, OPSET, compile

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

R = np.random.default_rng(0)
_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
          np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
          np.dtype(np.bool_): TensorProto.BOOL, np.dtype(np.uint8): TensorProto.UINT8}
_MDF_TYPES = {np.dtype(np.float32): "float32", np.dtype(np.int64): "int64", np.dtype(np.bool_): "bool",
              np.dtype(np.int32): "int32", np.dtype(np.uint8): "uint8", np.dtype(np.float64): "float64"}


def f32(*shape, scale=1.0):
    return (R.standard_normal(shape) * scale).astype(np.float32)


def i64(*values):
    return np.array(values, np.int64)


def run_onnx(op, inputs: dict, attrs: dict, n_out=1, opset=OPSET):
    names = list(inputs)
    node = helper.make_node(op, [n if inputs[n] is not None else "" for n in names],
                            [f"out{i}" for i in range(n_out)], **attrs)
    feeds = {n: v for n, v in inputs.items() if v is not None}
    vi = [helper.make_tensor_value_info(n, _TYPES[v.dtype], v.shape) for n, v in feeds.items()]
    outs = [onnx.ValueInfoProto(name=f"out{i}") for i in range(n_out)]    # types from shape inference
    g = helper.make_graph([node], "g", vi, outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def mdf_model(op, inputs: dict, attrs: dict, n_out=1, port_first=True):
    """One node: the first input an input port (unless all are parameters), the rest parameters."""
    names = [n for n, v in inputs.items() if v is not None]
    ports, params = {}, {}
    for i, n in enumerate(names):
        v = inputs[n]
        if i == 0 and port_first:
            ports[n] = {"shape": list(v.shape), "type": _MDF_TYPES[v.dtype]}
        else:
            params[n] = {"value": v.tolist()}
    spec = OPS[f"onnx::{op}"]
    if spec.variadic:
        args = {n: n for n in names}
    else:
        # inputs that may be absent in the middle (Resize roi) are skipped by name
        args = {n: n for n in names}
    args.update(attrs)
    params["f"] = {"function": f"onnx::{op}", "args": args}
    outputs = {f"y{i}": {"value": f"f[{i}]" if spec.multi else "f"} for i in range(n_out)}
    return {"m": {"graphs": {"g": {"nodes": {"n": {"input_ports": ports, "parameters": params,
                                                   "output_ports": outputs}}}}}}


def ours(op, inputs, attrs, n_out=1, backend="cpu", port_first=True):
    prog = compile(mdf_model(op, inputs, attrs, n_out, port_first), device=backend)
    feed = {} if not port_first or not prog.inputs else {prog.inputs[0].name: next(v for v in inputs.values()
                                                                                  if v is not None)}
    out = prog.run(feed, check=False)      # some cases feed NaN/Inf on purpose
    out = out if isinstance(out, dict) else {"y0": out}
    return [np.asarray(out[f"y{i}"]) for i in range(n_out)], prog


x4 = f32(2, 3, 9, 8)
x5 = f32(2, 4, 5, 7)
CASES = [
    # (op, inputs, attrs, options)
    ("Relu", {"X": f32(4, 5)}, {}), ("Sigmoid", {"X": f32(4, 5, scale=20)}, {}),
    ("Tanh", {"input": f32(4, 5)}, {}), ("Exp", {"input": f32(4, 5)}, {}),
    ("Log", {"input": np.abs(f32(4, 5)) + 0.1}, {}), ("Sqrt", {"X": np.abs(f32(4, 5))}, {}),
    ("Abs", {"X": f32(3)}, {}), ("Neg", {"X": f32(3)}, {}), ("Erf", {"input": f32(4, 5)}, {}),
    ("Reciprocal", {"X": f32(4, 5) + 5}, {}), ("Floor", {"X": f32(4, 5, scale=3)}, {}),
    ("Ceil", {"X": f32(4, 5, scale=3)}, {}), ("Round", {"X": np.array([0.5, 1.5, -2.5, 2.4, -0.6], np.float32)}, {}),
    ("Sign", {"input": f32(4, 5)}, {}), ("Sin", {"input": f32(4, 5)}, {}), ("Cos", {"input": f32(4, 5)}, {}),
    ("Tan", {"input": f32(4, 5, scale=0.5)}, {}), ("Asin", {"input": np.tanh(f32(4, 5))}, {}),
    ("Acos", {"input": np.tanh(f32(4, 5))}, {}), ("Atan", {"input": f32(4, 5)}, {}),
    ("Sinh", {"input": f32(4, 5)}, {}), ("Cosh", {"input": f32(4, 5)}, {}),
    ("Asinh", {"input": f32(4, 5)}, {}), ("Acosh", {"input": np.abs(f32(4, 5)) + 1.1}, {}),
    ("Atanh", {"input": np.tanh(f32(4, 5))}, {}),
    ("Softplus", {"X": f32(4, 5, scale=10)}, {}), ("Softsign", {"input": f32(4, 5)}, {}),
    ("Elu", {"X": f32(4, 5)}, {"alpha": 0.7}), ("Selu", {"X": f32(4, 5)}, {}),
    ("Celu", {"X": f32(4, 5)}, {"alpha": 1.5}),
    ("LeakyRelu", {"X": f32(4, 5)}, {"alpha": 0.3}),
    ("HardSigmoid", {"X": f32(4, 5, scale=4)}, {"alpha": 1 / 6, "beta": 0.5}),
    ("HardSwish", {"X": f32(4, 5, scale=4)}, {}), ("ThresholdedRelu", {"X": f32(4, 5)}, {"alpha": 0.4}),
    ("Shrink", {"input": f32(4, 5)}, {"bias": 0.2, "lambd": 0.6}),
    ("Mish", {"X": f32(4, 5, scale=3)}, {}, {"opset": 18}),
    ("Gelu", {"X": f32(4, 5, scale=3)}, {}, {"opset": 20}),
    ("Gelu", {"X": f32(4, 5, scale=3)}, {"approximate": "tanh"}, {"opset": 20}),
    ("PRelu", {"X": f32(2, 3, 4), "slope": f32(3, 1)}, {}),
    ("Not", {"X": f32(4, 5) > 0}, {}), ("IsNaN", {"X": np.array([1.0, np.nan, np.inf], np.float32)}, {}),
    ("IsInf", {"X": np.array([1.0, -np.inf, np.inf, np.nan], np.float32)}, {"detect_negative": 0}),
    ("Identity", {"input": f32(3, 2)}, {}),
    ("Clip", {"input": f32(4, 5, scale=5), "min": np.array(0, np.float32), "max": np.array(6, np.float32)}, {}),
    ("Clip", {"input": f32(4, 5, scale=5)}, {"min": -1.0, "max": 2.0}, {"opset": 6}),
    ("Add", {"A": f32(4, 5), "B": f32(5)}, {}), ("Sub", {"A": f32(4, 5), "B": f32(4, 5)}, {}),
    ("Mul", {"A": f32(4, 5), "B": f32(1, 5)}, {}), ("Div", {"A": f32(4, 5), "B": f32(5) + 3}, {}),
    ("Div", {"A": i64(7, -7, 7, -7, 0), "B": i64(2, 2, -2, -2, 3)}, {}),
    ("Pow", {"X": np.abs(f32(4, 5)) + 0.5, "Y": f32(5)}, {}),
    ("Mod", {"A": i64(7, -7, 7, -7), "B": i64(3, 3, -3, -3)}, {}),
    ("Mod", {"A": f32(6, scale=5), "B": f32(6) + 3}, {"fmod": 1}),
    ("Equal", {"A": i64(1, 2, 3), "B": i64(1, 0, 3)}, {}), ("Greater", {"A": f32(4, 5), "B": f32(5)}, {}),
    ("Less", {"A": f32(4, 5), "B": f32(5)}, {}), ("LessOrEqual", {"A": f32(4, 5), "B": f32(5)}, {}),
    ("GreaterOrEqual", {"A": f32(4, 5), "B": f32(5)}, {}),
    ("And", {"A": f32(6) > 0, "B": f32(6) > 0}, {}), ("Or", {"A": f32(6) > 0, "B": f32(6) > 0}, {}),
    ("Xor", {"A": f32(6) > 0, "B": f32(6) > 0}, {}),
    ("Sum", {"a": f32(3, 2), "b": f32(3, 2), "c": f32(2)}, {}),
    ("Max", {"a": f32(3, 2), "b": f32(3, 2)}, {}), ("Min", {"a": f32(3, 2), "b": f32(1, 2)}, {}),
    ("Mean", {"a": f32(3, 2), "b": f32(3, 2), "c": f32(3, 2)}, {}),
    ("Where", {"condition": f32(4, 5) > 0, "X": f32(4, 5), "Y": f32(5)}, {}),
    ("Cast", {"input": f32(4, 5, scale=3)}, {"to": TensorProto.INT64}),
    ("Cast", {"input": i64(1, 2, 3)}, {"to": TensorProto.FLOAT}),
    ("CastLike", {"input": i64(1, 2, 3), "target_type": f32(1)}, {}),
    ("MatMul", {"A": f32(2, 4, 5), "B": f32(5, 3)}, {}),
    ("Gemm", {"A": f32(4, 5), "B": f32(3, 5), "C": f32(3)}, {"transB": 1, "alpha": 0.5}),
    ("Gemm", {"A": f32(5, 4), "B": f32(5, 3), "C": f32(4, 3)}, {"transA": 1, "beta": 2.0}),
    ("Softmax", {"input": f32(4, 5, scale=5)}, {"axis": -1}), ("Softmax", {"input": f32(2, 4, 5)}, {"axis": 1}),
    ("LogSoftmax", {"input": f32(4, 5, scale=5)}, {"axis": -1}),
    ("Hardmax", {"input": f32(3, 4, 5)}, {"axis": 1}),
    ("BatchNormalization", {"X": x4, "scale": f32(3), "B": f32(3), "input_mean": f32(3),
                            "input_var": np.abs(f32(3)) + 0.5}, {"epsilon": 1e-3}),
    ("InstanceNormalization", {"input": x4, "scale": f32(3), "B": f32(3)}, {"epsilon": 1e-3}),
    ("LayerNormalization", {"X": f32(2, 3, 4), "Scale": f32(4), "B": f32(4)}, {"axis": -1, "epsilon": 1e-3}),
    ("LayerNormalization", {"X": f32(2, 3, 4), "Scale": f32(3, 4)}, {"axis": 1}, {"n_out": 3}),
    ("LRN", {"X": x4}, {"size": 3, "alpha": 0.01, "beta": 0.6, "bias": 1.5}),
    ("Dropout", {"data": f32(4, 4)}, {}, {"n_out": 2}),
    ("Flatten", {"input": x4}, {"axis": 1}), ("Flatten", {"input": x4}, {"axis": -1}),
    ("Flatten", {"input": x4}, {"axis": 0}),
    ("Reshape", {"data": x4, "shape": i64(0, -1, 4)}, {}),
    ("Transpose", {"data": x4}, {"perm": [0, 2, 3, 1]}), ("Transpose", {"data": x4}, {}),
    ("Concat", {"a": f32(2, 3), "b": f32(2, 4)}, {"axis": 1}),
    ("Concat", {"a": f32(2, 3), "b": f32(1, 3), "c": f32(3, 3)}, {"axis": -2}),
    ("Split", {"input": f32(6, 4), "split": i64(2, 4)}, {"axis": 0}, {"n_out": 2}),
    ("Split", {"input": f32(5, 4)}, {"axis": 0, "num_outputs": 3}, {"n_out": 3, "opset": 18}),
    ("Split", {"input": f32(4, 6)}, {"axis": 1, "split": [1, 5]}, {"n_out": 2, "opset": 11}),
    ("Pad", {"data": x4, "pads": i64(0, 0, 1, 2, 0, 0, 3, 0)}, {}),
    ("Pad", {"data": x4, "pads": i64(0, 0, 1, -2, 0, 0, -3, 2), "constant_value": np.array(1.5, np.float32)}, {}),
    ("Pad", {"data": x4, "pads": i64(0, 0, 2, 2, 0, 0, 1, 3)}, {"mode": "reflect"}),
    ("Pad", {"data": x4, "pads": i64(0, 0, 2, 2, 0, 0, 1, 3)}, {"mode": "edge"}),
    ("Pad", {"data": x4, "pads": i64(1, 2, 3, 1), "constant_value": np.array(0.5, np.float32),
             "axes": i64(2, -1)}, {}, {"opset": 18}),
    ("Pad", {"data": x4}, {"pads": [0, 0, 1, 1, 0, 0, 2, 0], "value": 2.0}, {"opset": 10}),
    ("Slice", {"data": x4, "starts": i64(1, 2), "ends": i64(8, 7), "axes": i64(2, 3)}, {}),
    ("Slice", {"data": x4, "starts": i64(-1, 100), "ends": i64(-100, 0), "axes": i64(2, -1),
               "steps": i64(-2, -3)}, {}),
    ("Slice", {"data": x4, "starts": i64(0, 1), "ends": i64(2, 9223372036854775807), "axes": i64(0, 3),
               "steps": i64(1, 2)}, {}),
    ("Slice", {"data": x4}, {"starts": [1], "ends": [3], "axes": [1]}, {"opset": 9}),
    ("Squeeze", {"data": f32(2, 1, 3, 1), "axes": i64(1, -1)}, {}),
    ("Squeeze", {"data": f32(2, 1, 3, 1)}, {}),
    ("Squeeze", {"data": f32(2, 1, 3, 1)}, {"axes": [1]}, {"opset": 11}),
    ("Unsqueeze", {"data": f32(2, 3), "axes": i64(0, -1)}, {}),
    ("Unsqueeze", {"data": f32(2, 3)}, {"axes": [1]}, {"opset": 11}),
    ("Gather", {"data": f32(5, 4), "indices": i64(0, 4, -1, 2)}, {"axis": 0}),
    ("Gather", {"data": f32(3, 5, 2), "indices": np.array([[1, -2], [0, 4]], np.int64)}, {"axis": 1}),
    ("Gather", {"data": f32(3, 5), "indices": np.array(2, np.int64)}, {"axis": 1}),
    ("GatherElements", {"data": f32(3, 4), "indices": np.array([[0, 1, 2, -1], [3, 0, 0, 1]], np.int64)},
     {"axis": 1}),
    ("GatherND", {"data": f32(3, 4, 5), "indices": np.array([[0, 1], [2, -1], [1, 3]], np.int64)}, {}),
    ("GatherND", {"data": f32(2, 4, 5), "indices": np.array([[[1], [3]], [[0], [2]]], np.int64)}, {"batch_dims": 1}),
    ("ScatterND", {"data": f32(4, 5), "indices": np.array([[1], [3]], np.int64), "updates": f32(2, 5)}, {}),
    ("ScatterND", {"data": f32(4, 5), "indices": np.array([[1, 2], [1, 2], [-1, 0]], np.int64), "updates": f32(3)},
     {"reduction": "add"}, {"opset": 18}),
    ("ScatterElements", {"data": f32(3, 4), "indices": np.array([[0, 2], [1, -1]], np.int64), "updates": f32(2, 2)},
     {"axis": 1}),
    ("ScatterElements", {"data": f32(3, 4), "indices": np.array([[0, 0], [2, 0]], np.int64), "updates": f32(2, 2)},
     {"axis": 0, "reduction": "max"}, {"opset": 18}),
    ("Tile", {"input": f32(2, 3), "repeats": i64(2, 3)}, {}),
    ("Expand", {"input": f32(2, 1, 3, 1), "shape": i64(1, 4, 1, 5)}, {}),
    ("DepthToSpace", {"input": f32(1, 8, 2, 3)}, {"blocksize": 2}),
    ("DepthToSpace", {"input": f32(1, 8, 2, 3)}, {"blocksize": 2, "mode": "CRD"}),
    ("SpaceToDepth", {"input": f32(1, 2, 4, 6)}, {"blocksize": 2}),
    ("CumSum", {"x": f32(3, 4), "axis": np.array(1, np.int64)}, {}),
    ("CumSum", {"x": f32(3, 4), "axis": np.array(0, np.int64)}, {"exclusive": 1, "reverse": 1}),
    ("TopK", {"X": np.array([[3, 1, 3, 2], [0, 5, 5, 1]], np.float32), "K": i64(3)}, {"axis": -1}, {"n_out": 2}),
    ("TopK", {"X": f32(4, 5), "K": i64(2)}, {"axis": 0, "largest": 0}, {"n_out": 2}),
    ("Einsum", {"a": f32(2, 3, 4), "b": f32(4, 5)}, {"equation": "bij,jk->bik"}),
    ("ArgMax", {"data": np.array([[1, 3, 3], [2, 0, 2]], np.float32)}, {"axis": 1}),
    ("ArgMax", {"data": np.array([[1, 3, 3], [2, 0, 2]], np.float32)}, {"axis": 1, "keepdims": 0,
                                                                       "select_last_index": 1}),
    ("ArgMin", {"data": f32(3, 4)}, {"axis": 0}),
    ("ReduceSum", {"data": x4, "axes": i64(1, 3)}, {"keepdims": 0}),
    ("ReduceSum", {"data": x4}, {}),
    ("ReduceSum", {"data": x4, "axes": np.zeros(0, np.int64)}, {"noop_with_empty_axes": 1}),
    ("ReduceMean", {"data": x4}, {"axes": [2, 3], "keepdims": 0}),
    ("ReduceMean", {"data": x4, "axes": i64(-1)}, {}, {"opset": 18}),
    ("ReduceMax", {"data": x4}, {"axes": [1], "keepdims": 1}),
    ("ReduceMin", {"data": x4}, {"axes": [0, 2]}),
    ("ReduceProd", {"data": f32(3, 4) + 2}, {"axes": [1]}),
    ("ReduceL1", {"data": x4}, {"axes": [1]}), ("ReduceL2", {"data": x4}, {"axes": [2]}),
    ("ReduceSumSquare", {"data": x4}, {"axes": [3]}),
    ("ReduceLogSum", {"data": np.abs(x4) + 0.1}, {"axes": [1]}),
    ("ReduceLogSumExp", {"data": x4 * 30}, {"axes": [1, 2], "keepdims": 0}),
    ("Shape", {"data": x4}, {}), ("Shape", {"data": x4}, {"start": 1, "end": -1}),
    ("Size", {"data": x4}, {}),
    ("ConstantOfShape", {"input": i64(2, 3)}, {"value": helper.make_tensor("v", TensorProto.FLOAT, [1], [1.5])},
     {"all_params": True}),
    ("ConstantOfShape", {"input": i64(4)}, {}, {"all_params": True}),
    ("Range", {"start": np.array(1, np.int64), "limit": np.array(10, np.int64), "delta": np.array(3, np.int64)},
     {}, {"all_params": True}),
    ("Range", {"start": np.array(1.0, np.float32), "limit": np.array(-2.0, np.float32),
               "delta": np.array(-0.7, np.float32)}, {}, {"all_params": True}),
    ("GlobalAveragePool", {"X": x4}, {}), ("GlobalMaxPool", {"X": x4}, {}),
    ("MaxPool", {"X": x4}, {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 1, 1]}),
    ("MaxPool", {"X": f32(2, 3, 10)}, {"kernel_shape": [3], "strides": [2]}),
    ("MaxPool", {"X": x4}, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    ("MaxPool", {"X": x5}, {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 1, 1]}),
    ("MaxPool", {"X": x4}, {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("MaxPool", {"X": x5}, {"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ("MaxPool", {"X": x4}, {"kernel_shape": [2, 2], "dilations": [2, 1]}),
    ("MaxPool", {"X": x4}, {"kernel_shape": [2, 2], "strides": [2, 2]}, {"n_out": 2}),
    ("MaxPool", {"X": x5}, {"kernel_shape": [3, 2], "pads": [1, 0, 1, 1], "storage_order": 1}, {"n_out": 2}),
    ("AveragePool", {"X": x4}, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                "count_include_pad": 0}),
    ("AveragePool", {"X": x4}, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                "count_include_pad": 1}),
    ("AveragePool", {"X": x4}, {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("AveragePool", {"X": x5}, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    ("AveragePool", {"X": x5}, {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 1, 1],
                                "count_include_pad": 1}),
    ("AveragePool", {"X": x5}, {"kernel_shape": [3, 2], "strides": [2, 1], "auto_pad": "SAME_UPPER"}),
    ("Conv", {"X": x4, "W": f32(4, 3, 3, 3), "B": f32(4)}, {"pads": [1, 1, 1, 1]}),
    ("Conv", {"X": x4, "W": f32(6, 1, 3, 2)}, {"group": 3, "strides": [2, 1], "dilations": [2, 1],
                                                "pads": [0, 1, 2, 0]}),
    ("Conv", {"X": f32(2, 4, 11), "W": f32(6, 2, 3), "B": f32(6)}, {"group": 2, "dilations": [2]}),
    ("Conv", {"X": x4, "W": f32(5, 3, 1, 1), "B": f32(5)}, {}),
    ("Conv", {"X": x4, "W": f32(5, 3, 1, 1)}, {"strides": [2, 3]}),
    ("Conv", {"X": f32(2, 6, 7, 7), "W": f32(6, 1, 3, 3), "B": f32(6)}, {"group": 6, "pads": [1, 1, 1, 1]}),
    ("Conv", {"X": f32(2, 4, 7, 7), "W": f32(8, 1, 3, 3)}, {"group": 4, "strides": [2, 2]}),
    ("Conv", {"X": f32(2, 4, 6, 6), "W": f32(4, 2, 1, 1)}, {"group": 2}),
    # grouped with several channels a group (ResNeXt, RegNet): one batched product
    ("Conv", {"X": f32(2, 8, 7, 7), "W": f32(6, 4, 3, 3), "B": f32(6)}, {"group": 2, "pads": [1, 1, 1, 1]}),
    ("Conv", {"X": f32(2, 8, 9, 8), "W": f32(12, 2, 3, 2), "B": f32(12)},
     {"group": 4, "strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 0, 1]}),
    ("Conv", {"X": x4, "W": f32(4, 3, 3, 2)}, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("Conv", {"X": x4, "W": f32(4, 3, 3, 2)}, {"auto_pad": "VALID"}),
    ("ConvTranspose", {"X": f32(2, 3, 4, 5), "W": f32(3, 2, 3, 3), "B": f32(2)}, {"strides": [2, 2]}),
    ("ConvTranspose", {"X": f32(2, 3, 4, 5), "W": f32(3, 2, 3, 2)},
     {"strides": [2, 1], "pads": [1, 0, 1, 1], "output_padding": [1, 0]}),
    ("ConvTranspose", {"X": f32(2, 4, 5), "W": f32(4, 3, 3)}, {"group": 2, "dilations": [2]}),
    ("ConvTranspose", {"X": f32(1, 2, 3, 3), "W": f32(2, 3, 3, 3)}, {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("ConvTranspose", {"X": f32(1, 2, 3, 3), "W": f32(2, 3, 4, 4)}, {"strides": [2, 2], "output_shape": [7, 7]}),
    ("Resize", {"X": f32(1, 2, 3, 4), "roi": None, "scales": np.array([1, 1, 2, 3], np.float32)},
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
    ("Resize", {"X": f32(1, 2, 3, 4), "roi": None, "scales": np.array([1, 1, 2.5, 1.5], np.float32)},
     {"mode": "nearest"}),
    ("Resize", {"X": f32(1, 2, 3, 4), "roi": None, "scales": np.array([1, 1, 2, 2], np.float32)},
     {"mode": "linear"}),
    ("Resize", {"X": f32(1, 2, 5, 4), "roi": None, "scales": None, "sizes": i64(1, 2, 3, 7)},
     {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
    ("Resize", {"X": f32(1, 2, 5, 4), "roi": None, "scales": np.array([1, 1, 0.6, 1.75], np.float32)},
     {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}),
    ("Resize", {"X": f32(1, 2, 3, 4), "roi": None, "scales": np.array([1, 1, 2, 2], np.float32)},
     {"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn", "nearest_mode": "ceil"}),
    ("Resize", {"X": f32(1, 2, 5, 6), "roi": None, "scales": np.array([1, 1, 1.6, 0.7], np.float32)},
     {"mode": "cubic"}),
    ("Resize", {"X": f32(1, 2, 5, 6), "roi": None, "scales": None, "sizes": i64(1, 2, 9, 4)},
     {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1, "coordinate_transformation_mode": "asymmetric"}),
    ("Resize", {"X": f32(1, 2, 5, 6), "roi": None, "scales": np.array([1, 1, 2, 3], np.float32)},
     {"mode": "cubic", "coordinate_transformation_mode": "align_corners"}),
    ("Resize", {"X": f32(1, 2, 5, 6), "roi": np.array([0, 0, 0.2, 0.1, 1, 1, 0.9, 1.2], np.float32), "scales": None,
                "sizes": i64(1, 2, 4, 5)},
     {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": 3.5}),
    ("Resize", {"X": f32(1, 2, 8, 9), "roi": None, "scales": np.array([1, 1, 0.5, 0.4], np.float32)},
     {"mode": "linear", "antialias": 1}, {"opset": 18}),
    ("Resize", {"X": f32(1, 2, 5, 6), "roi": None, "scales": None, "sizes": i64(3, 4)},
     {"mode": "nearest", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"}, {"opset": 18}),
    ("Upsample", {"X": f32(1, 2, 3, 4), "scales": np.array([1, 1, 2, 3], np.float32)}, {"mode": "nearest"},
     {"opset": 9}),
    ("Upsample", {"X": f32(1, 2, 3, 4), "scales": np.array([1, 1, 2, 2], np.float32)}, {"mode": "linear"},
     {"opset": 9}),
]
NOT_AN_ORT_CASE = {"onnx::Constant"}   # tested in the interop tests (folded, no inputs)


IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


def unpack(case):
    """(op, inputs, ONNX attrs, options, MDF attrs): tensor attributes as nested lists, as
    an MDF file holds them."""
    op, inputs, attrs = case[:3]
    opts = case[3] if len(case) > 3 else {}
    mdf_attrs = {k: (onnx.numpy_helper.to_array(v).tolist() if isinstance(v, onnx.TensorProto) else v)
                 for k, v in attrs.items()}
    return op, inputs, attrs, opts, mdf_attrs


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_onnxruntime(case):
    op, inputs, attrs, opts, mdf_attrs = unpack(case)
    n_out = opts.get("n_out", 1)
    want = run_onnx(op, inputs, attrs, n_out=n_out, opset=opts.get("opset", OPSET))
    got, prog = ours(op, inputs, mdf_attrs, n_out=n_out, port_first=not opts.get("all_params"))
    for g, w in zip(got, want):
        assert g.shape == w.shape, (g.shape, w.shape)
        if w.dtype.kind == "f":
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6)
        else:
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_on_the_strict_cupy_standin(case, strict_gpu):
    """The same op on the CuPy stand-in: same numbers, and per batch exactly one input
    copy to the device and one result copy back (a static input never comes back)."""
    import fake_cupy
    op, inputs, _, opts, mdf_attrs = unpack(case)
    n_out = opts.get("n_out", 1)
    port_first = not opts.get("all_params")
    want, _ = ours(op, inputs, mdf_attrs, n_out=n_out, port_first=port_first)
    got, prog = ours(op, inputs, mdf_attrs, n_out=n_out, backend=strict_gpu, port_first=port_first)
    for g, w in zip(got, want):
        # generated kernels (convolutions) sum in another order than NumPy: float32 rounding
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6)
    # steady state
    feed = {} if not prog.inputs else {prog.inputs[0].name: next(v for v in inputs.values() if v is not None)}
    fake_cupy.COUNT.reset()
    prog.run(feed, check=False)
    host_outputs = sum(o.ref.place == "host" for o in prog.outputs)
    assert fake_cupy.COUNT.d2h_syncs == n_out - host_outputs, fake_cupy.COUNT.log
    assert fake_cupy.COUNT.h2d_copies == len(feed), fake_cupy.COUNT.log
    fake_cupy.COUNT.reset()
    prog.run(feed, to_host=False, check=False)
    assert fake_cupy.COUNT.d2h_syncs == 0, fake_cupy.COUNT.log


def test_every_onnx_kernel_is_tested_against_onnxruntime():
    tested = {f"onnx::{c[0]}" for c in CASES} | NOT_AN_ORT_CASE
    assert {k for k in OPS if k.startswith("onnx::")} == tested


def _schema(name):
    """The newest form up to opset 21: the kernels take today's inputs, and accept the
    older attribute forms besides."""
    import onnx.defs
    return onnx.defs.get_schema(name, 21)


@pytest.mark.parametrize("name", sorted(k for k in OPS if k.startswith("onnx::")))
def test_declared_contract_matches_the_onnx_schema(name):
    """Inputs and outputs as ONNX names them; every schema attribute declared (so it is
    implemented or refused, never dropped), with the schema's type."""
    import onnx.defs
    spec = OPS[name]
    s = _schema(name.split("::")[1])
    schema_inputs = [i.name for i in s.inputs]
    assert list(spec.tensor_names) == schema_inputs[:len(spec.tensor_names)] or spec.variadic
    if spec.variadic:
        assert spec.inputs[0] == schema_inputs[0]
    assert list(spec.outputs) == [o.name for o in s.outputs]
    types = {onnx.defs.OpSchema.AttrType.INT: "INT", onnx.defs.OpSchema.AttrType.INTS: "INTS",
             onnx.defs.OpSchema.AttrType.FLOAT: "FLOAT", onnx.defs.OpSchema.AttrType.FLOATS: "FLOATS",
             onnx.defs.OpSchema.AttrType.STRING: "STRING", onnx.defs.OpSchema.AttrType.TENSOR: "TENSOR"}
    for a, sa in s.attributes.items():
        if a in ("sparse_value", "value_string", "value_strings"):     # Constant kinds refused by its check
            continue
        assert a in spec.attrs, f"{name} does not declare attribute {a}"
        assert spec.attrs[a].type == types[sa.type], (name, a)


def test_kernels_take_no_catch_all_keywords():
    import inspect
    for name, spec in OPS.items():
        params = inspect.signature(spec.kernel).parameters.values()
        assert not any(p.kind == p.VAR_KEYWORD for p in params), name
        names = {p.name for p in params}
        assert set(spec.attrs) <= names, (name, set(spec.attrs) - names)


@pytest.mark.parametrize("op,attrs,match", [
    ("MaxPool", {"kernel_shape": [2, 2], "auto_pad": "SAME_MIDDLE"}, "auto_pad"),
    ("Resize", {"mode": "area"}, "area"),
    ("Resize", {"coordinate_transformation_mode": "crop"}, "crop"),
    ("Resize", {"antialias": 1}, "antialias"),          # nearest has no antialiasing filter
    ("Pad", {"mode": "mirror"}, "mirror"),
    ("Cast", {"to": 8}, "strings"),
    ("BatchNormalization", {"training_mode": 1}, "inference"),
    ("Gelu", {"approximate": "erf"}, "approximate"),
    ("DepthToSpace", {"blocksize": 2, "mode": "XYZ"}, "mode"),
])
def test_unimplemented_attribute_values_are_refused_at_compile_time(op, attrs, match):
    from gpu_mdf.errors import CompileError
    spec = OPS[f"onnx::{op}"]
    inputs = {n: f32(1, 2, 4, 4) for n in spec.inputs}
    with pytest.raises(CompileError, match=match):
        compile(mdf_model(op, inputs, attrs), device="cpu")


def test_unknown_attribute_is_refused():
    from gpu_mdf.errors import CompileError
    with pytest.raises(CompileError, match="no argument 'ceiling'"):
        compile(mdf_model("MaxPool", {"X": f32(1, 1, 4, 4)}, {"kernel_shape": [2, 2], "ceiling": 1}), device="cpu")


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


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_onnx_export_of_the_compiled_graph(case):
    """gpu_mdf.engine.onnx_export (the benchmark's ONNX Runtime baseline) reproduces every op."""
    from gpu_mdf.engine.onnx_export import to_onnx
    op, inputs, _, opts, mdf_attrs = unpack(case)
    n_out = opts.get("n_out", 1)
    port_first = not opts.get("all_params")
    want, prog = ours(op, inputs, mdf_attrs, n_out=n_out, port_first=port_first)
    model = to_onnx(prog)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {} if not prog.inputs else {prog.inputs[0].name: next(v for v in inputs.values() if v is not None)}
    got = sess.run(None, feed)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6)


def test_readme_lists_exactly_the_ops_of_the_table():
    import re
    from pathlib import Path
    text = Path("README.md").read_text()
    block = text[text.index("ONNX ops:"):text.index("and the MDF standard functions")]
    block = re.sub(r"\([^)]*\)", "", block.split(":", 1)[1])        # drop the notes in parentheses
    listed = {w.strip(" ;") for w in block.replace("\n", " ").split(",") if w.strip(" ;")}
    onnx_ops = {k.split("::")[1] for k in OPS if k.startswith("onnx::")}
    assert listed == onnx_ops
    assert f"{len(onnx_ops)} ONNX ops" in text


def test_weight_forms_are_made_once_for_constants_only():
    """A kernel's form of its weights (a transposed copy) is kept only for the constants the
    binder froze, and made again on every call for any other array, read-only or not, so
    an array whose values change never meets an old form of itself."""
    from gpu_mdf.engine.ops import _WEIGHT_FORMS, frozen, weight_form
    made = []

    def make(w):
        made.append(1)
        return w.T.copy()
    owned = frozen(np.arange(6.0).reshape(2, 3))
    first = weight_form(owned, "t", functools.partial(make, owned))
    assert weight_form(owned, "t", functools.partial(make, owned)) is first and len(made) == 1
    assert not first.flags.writeable                           # a kept form is shared: read-only
    w = np.arange(6.0).reshape(2, 3)
    ro = w.view()
    ro.flags.writeable = False                                 # read-only, but not the program's
    for value in (1.0, 100.0):
        w[0, 0] = value
        assert weight_form(w, "t", functools.partial(make, w))[0, 0] == value
        assert weight_form(ro, "t", functools.partial(make, ro))[0, 0] == value
    assert len(made) == 5
    key = (id(owned), "t")
    assert key in _WEIGHT_FORMS
    del owned, first
    assert key not in _WEIGHT_FORMS                            # gone with its array


def test_constants_are_what_they_hold_at_compile():
    """A caller's ``constants=`` array changed after compile changes nothing: the program
    holds a copy (as it does on a GPU), so no kept form of it can go stale."""
    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    r = np.random.default_rng(3)
    w = r.standard_normal((4, 2, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 6, 6]),
                                            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 6, 6])])
    doc = onnx_to_mdf_doc(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model_id="c")
    x = r.standard_normal((2, 2, 6, 6)).astype(np.float32)
    prog = compile(doc, device="cpu", constants={"w": w})
    before = prog.run(x)
    w *= -2.0
    np.testing.assert_array_equal(prog.run(x), before)
    again = compile(doc, device="cpu", constants={"w": w}).run(x)     # compiled again: the new weights
    np.testing.assert_allclose(again, -2.0 * before, rtol=1e-5, atol=1e-5 * float(np.abs(before).max()))


def test_a_compiled_conv_reads_its_weights_read_only_and_agrees_with_onnx_runtime():
    """A Conv's constant weights reach the kernel read-only (their im2col form kept), and two
    batches agree with ONNX Runtime on random non-zero weights."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    from gpu_mdf.engine.ops import _WEIGHT_FORMS
    r = np.random.default_rng(7)
    w = r.standard_normal((5, 3, 3, 3)).astype(np.float32)
    b = r.standard_normal(5).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 0, 1, 2], strides=[1, 2])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 9, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5, 9, 4])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    prog = compile(onnx_to_mdf_doc(model, model_id="conv"), device="cpu")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in (1, 2):
        x = np.random.default_rng(seed).standard_normal((4, 3, 9, 8)).astype(np.float32)
        want = sess.run(None, {"x": x})[0]
        np.testing.assert_allclose(prog.run(x), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
        assert any(form == "im2col" for _, form in _WEIGHT_FORMS)     # made from the read-only constant


# A Conv's bias of another length than its output channels, and strides, dilations or kernel
# sizes under 1, are refused with one line on every path (the compiled kernels read the bias
# without bounds checks: a short one read past its end, a long one lost its tail)
CONV_PATHS = {
    # name: (x shape, w shape, group, attrs)
    "depthwise 3x3 (rows)": ((1, 4, 6, 6), (4, 1, 3, 3), 4, dict(pads=[1, 1, 1, 1])),
    "depthwise 3x3 (per pixel)": ((1, 32, 6, 6), (32, 1, 3, 3), 32, dict(pads=[1, 1, 1, 1])),
    "depthwise multiplier 2": ((1, 4, 6, 6), (8, 1, 3, 3), 4, dict(pads=[1, 1, 1, 1])),
    "im2col": ((1, 3, 6, 6), (5, 3, 3, 3), 1, {}),
    "1x1": ((1, 3, 6, 6), (5, 3, 1, 1), 1, {}),
    "one channel": ((1, 1, 6, 6), (5, 1, 3, 3), 1, {}),
    "grouped": ((1, 4, 6, 6), (6, 2, 3, 3), 2, {}),
}


@pytest.mark.parametrize("bias_len", [1, "F-1", "F+1"])
@pytest.mark.parametrize("name", sorted(CONV_PATHS))
def test_a_conv_bias_of_another_length_is_refused(name, bias_len):
    from gpu_mdf.engine.ops import OpError, nn
    xs, ws, g, attrs = CONV_PATHS[name]
    f = ws[0]
    n = {1: 1, "F-1": f - 1, "F+1": f + 1}[bias_len]
    r = np.random.default_rng(0)
    x, w = r.standard_normal(xs).astype(np.float32), r.standard_normal(ws).astype(np.float32)
    with pytest.raises(OpError, match=rf"bias of shape \({n},\) for {f} output channels"):
        nn.conv(np, x, w, r.standard_normal(n).astype(np.float32), group=g, **attrs)
    with pytest.raises(OpError, match="bias of shape"):
        nn.conv(np, x, w, r.standard_normal((f, 1)).astype(np.float32), group=g, **attrs)
    y = nn.conv(np, x, w, r.standard_normal(f).astype(np.float32), group=g, **attrs)     # the right one runs
    assert y.shape[1] == f


def test_a_conv_transpose_bias_of_another_length_is_refused():
    from gpu_mdf.engine.ops import OpError, nn
    r = np.random.default_rng(0)
    x, w = r.standard_normal((1, 3, 4, 4)).astype(np.float32), r.standard_normal((3, 5, 3, 3)).astype(np.float32)
    with pytest.raises(OpError, match=r"ConvTranspose: bias of shape \(1,\) for 5 output channels"):
        nn.conv_transpose(np, x, w, np.ones(1, np.float32))


@pytest.mark.parametrize("attrs, word", [(dict(strides=[0, 1]), "strides"), (dict(strides=[1, -2]), "strides"),
                                         (dict(dilations=[0, 1]), "dilations"), (dict(dilations=[-1, 1]), "dilations")])
def test_strides_and_dilations_under_one_are_refused(attrs, word):
    from gpu_mdf.engine.ops import OpError, nn
    r = np.random.default_rng(0)
    x = r.standard_normal((1, 4, 8, 8)).astype(np.float32)
    with pytest.raises(OpError, match=rf"Conv: {word} \[.*\] \(each must be 1 or more\)"):
        nn.conv(np, x, r.standard_normal((4, 1, 3, 3)).astype(np.float32), group=4, **attrs)
    with pytest.raises(OpError, match=rf"MaxPool: {word} .*each must be 1 or more"):
        nn.max_pool(np, x, auto_pad="NOTSET", ceil_mode=0, kernel_shape=[2, 2], pads=None, storage_order=0,
                    **{"strides": None, "dilations": None, **attrs})
    with pytest.raises(OpError, match=rf"ConvTranspose: {word} .*each must be 1 or more"):
        nn.conv_transpose(np, x, r.standard_normal((4, 2, 3, 3)).astype(np.float32), **attrs)
