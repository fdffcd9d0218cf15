"""Merging layers: Add, Subtract, Multiply, Average, Maximum, Minimum, Concatenate, Dot."""

from __future__ import annotations

import numpy as np

from .normalization import l2_normalize
from .registry import fold, max2, min2, translator


def _add2(b, a, c, name="sum"):
    return b.op(name, "onnx::Add", A=a, B=c)


@translator("Add")
def _add(layer, b, xs):
    return fold(b, xs, _add2, "sum")


@translator("Subtract")
def _subtract(layer, b, xs):
    return b.op("sub", "onnx::Sub", A=xs[0], B=xs[1])


@translator("Multiply")
def _multiply(layer, b, xs):
    return fold(b, xs, lambda b, a, c, name: b.op(name, "onnx::Mul", A=a, B=c), "mul")


@translator("Average")
def _average(layer, b, xs):  # Keras: sum, then divide by the count
    return b.op("mean", "onnx::Div", A=fold(b, xs, _add2, "sum"), B=b.param("count", np.float32(len(xs))))


@translator("Maximum")
def _maximum(layer, b, xs):
    return fold(b, xs, max2, "max")


@translator("Minimum")
def _minimum(layer, b, xs):
    return fold(b, xs, min2, "min")


@translator("Concatenate")
def _concatenate(layer, b, xs):
    # variadic: the args are named like the node's input ports (the node holds nothing
    # else), so modeci_mdf's EvaluableGraph sees exactly these inputs
    rank = len(b.in_shapes[0])
    return b.op("concat", "onnx::Concat", axis=int(layer.axis) % rank, **{x: x for x in xs})


@translator("Dot")
def _dot(layer, b, xs):
    """Keras's batch_dot of two rank-2 or rank-3 tensors, optionally L2-normalised first."""
    ranks = [len(s) for s in b.in_shapes]
    axes = layer.axes if isinstance(layer.axes, (list, tuple)) else [layer.axes] * 2
    axes = [a % r for a, r in zip(axes, ranks)]
    if ranks not in ([2, 2], [3, 3]):
        b.unsupported(f"Dot of rank-{ranks[0]} and rank-{ranks[1]} inputs (rank 2 or 3)")
    x1, x2 = xs
    if layer.normalize:   # ops.normalize: x * min(rsqrt(sum x^2), 1 / epsilon), epsilon 1e-7
        x1, x2 = (l2_normalize(b, x, [axis], 1e7, names=[f"{v}{n}" for v in ("sq", "ss", "norm", "inv", "cap", "unit")])
                  for n, x, axis in ((1, x1, axes[0]), (2, x2, axes[1])))
    if ranks == [2, 2]:
        return b.op("dot", "onnx::ReduceSum", data=b.op("prod", "onnx::Mul", A=x1, B=x2), axes=[1], keepdims=1)
    a = x1 if axes[0] == 2 else b.op("a_t", "onnx::Transpose", data=x1, perm=[0, 2, 1])
    c = x2 if axes[1] == 1 else b.op("b_t", "onnx::Transpose", data=x2, perm=[0, 2, 1])
    return b.op("dot", "onnx::MatMul", A=a, B=c)
