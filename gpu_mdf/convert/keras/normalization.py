"""Normalisation layers: BatchNormalization, LayerNormalization, GroupNormalization,
UnitNormalization, and the preprocessing layers Normalization and Rescaling."""

from __future__ import annotations

import numpy as np

from .registry import max2, min2, translator, weights


@translator("BatchNormalization")
def _batch_norm(layer, b, xs):
    """Inference BN as ``x * inv + shift`` with ``inv = gamma / sqrt(var + eps)`` and
    ``shift = beta - mean * inv`` (what TensorFlow computes). The constants fold once;
    the per-batch work broadcasts along the channel axis without transposes."""
    rank = len(b.in_shapes[0])
    axis = layer.axis
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            b.unsupported(f"axis={axis}")
        axis = axis[0]
    axis = axis % rank
    w = weights(layer)
    c = w["moving_mean"].shape[0]
    gamma = b.param("gamma", w["gamma"]) if "gamma" in w else b.param("gamma", np.ones(c, np.float32))
    beta = b.param("beta", w["beta"]) if "beta" in w else b.param("beta", np.zeros(c, np.float32))
    mean = b.param("moving_mean", w["moving_mean"])
    var = b.param("moving_variance", w["moving_variance"])
    inv = b.op("inv", "onnx::Div", A=gamma, B=_std(b, var, layer.epsilon))
    shift = b.op("shift", "onnx::Sub", A=beta, B=b.op("mean_inv", "onnx::Mul", A=mean, B=inv))
    if axis != rank - 1:  # broadcast over the axes after the channel axis
        shape = [c] + [1] * (rank - 1 - axis)
        inv = b.op("inv_b", "onnx::Reshape", data=inv, shape=shape)
        shift = b.op("shift_b", "onnx::Reshape", data=shift, shape=shape)
    return b.op("batchnorm", "onnx::Add", A=b.op("scaled", "onnx::Mul", A=xs[0], B=inv), B=shift)


def _moments(b, x, axes):
    """The mean of ``x`` over ``axes``, ``x`` centred, and its variance (axes kept)."""
    mean = b.op("mean", "onnx::ReduceMean", data=x, axes=axes, keepdims=1)
    d = b.op("centered", "onnx::Sub", A=x, B=mean)
    var = b.op("variance", "onnx::ReduceMean", data=b.op("squared", "onnx::Mul", A=d, B=d), axes=axes, keepdims=1)
    return mean, d, var


def _std(b, var, epsilon):
    """sqrt(var + epsilon)."""
    return b.op("std", "onnx::Sqrt", X=b.op("var_eps", "onnx::Add", A=var, B=b.param("epsilon", np.float32(epsilon))))


@translator("LayerNormalization")
def _layer_norm(layer, b, xs):
    """Keras's own algebra: inv = gamma / sqrt(var + eps); y = (x - mean) * inv + beta,
    with mean and var over the normalised axes (ReduceMean, opset 15 form)."""
    rank = len(b.in_shapes[0])
    axes = _axes(layer.axis, rank)
    if getattr(layer, "rms_scaling", False):
        b.unsupported("rms_scaling=True")
    w = weights(layer)
    _, d, var = _moments(b, xs[0], axes)
    y = b.op("normalized", "onnx::Div", A=d, B=_std(b, var, layer.epsilon))
    # gamma/beta have the normalised axes' shape; broadcast them over the others
    bshape = [b.in_shapes[0][a] if a in axes else 1 for a in range(axes[0], rank)]
    if "gamma" in w:
        g = b.op("gamma_b", "onnx::Reshape", data=b.param("gamma", w["gamma"]), shape=bshape)
        y = b.op("scaled", "onnx::Mul", A=y, B=g)
    if "beta" in w:
        bt = b.op("beta_b", "onnx::Reshape", data=b.param("beta", w["beta"]), shape=bshape)
        y = b.op("shifted", "onnx::Add", A=y, B=bt)
    return y


@translator("GroupNormalization")
def _group_norm(layer, b, xs):
    """Keras's algebra on (N, ..., groups, C/groups): moments over every axis but the batch
    and the group; inv = gamma / sqrt(var + eps); y = x * inv + (beta - mean * inv)."""
    shape = b.in_shapes[0]
    rank = len(shape)
    if layer.axis not in (-1, rank - 1):
        b.unsupported(f"axis={layer.axis} (channels-last only)")
    if any(d is None for d in shape[1:]):
        b.unsupported("an input with an unknown size")
    c, g = int(shape[-1]), int(layer.groups)
    grouped = [0] + [int(d) for d in shape[1:-1]] + [g, c // g]
    x = b.op("grouped", "onnx::Reshape", data=xs[0], shape=grouped)
    mean, _, var = _moments(b, x, [a for a in range(1, rank + 1) if a != rank - 1])
    inv = b.op("inv", "onnx::Reciprocal", X=_std(b, var, layer.epsilon))
    w = weights(layer)
    bshape = [1] * (rank - 1) + [g, c // g]
    if "gamma" in w:
        inv = b.op("inv_g", "onnx::Mul", A=inv, B=b.op("gamma_b", "onnx::Reshape", data=b.param("gamma", w["gamma"]),
                                                        shape=bshape))
    res = b.op("res", "onnx::Neg", X=b.op("mean_inv", "onnx::Mul", A=mean, B=inv))
    if "beta" in w:
        res = b.op("res_b", "onnx::Add", A=res, B=b.op("beta_b", "onnx::Reshape", data=b.param("beta", w["beta"]),
                                                       shape=bshape))
    y = b.op("normalized", "onnx::Add", A=b.op("scaled", "onnx::Mul", A=x, B=inv), B=res)
    return b.op("ungrouped", "onnx::Reshape", data=y, shape=[0] + [int(d) for d in shape[1:]])


@translator("UnitNormalization")
def _unit_norm(layer, b, xs):
    """x * min(1 / sqrt(sum x^2), 1e12), as Keras's ops.normalize(order=2, epsilon=1e-12)."""
    return l2_normalize(b, xs[0], _axes(layer.axis, len(b.in_shapes[0])), 1e12)


def l2_normalize(b, x, axes, cap, names=("sq", "square_sum", "norm", "inv_norm", "capped", "normalized")):
    """x * min(1 / sqrt(sum of x^2 over ``axes``), cap): Keras's ops.normalize(order=2) with
    epsilon 1 / cap. ``names`` name its values: squares, sum, norm, inverse, capped, result."""
    sq, square_sum, norm, inverse, capped, out = names
    ss = b.op(square_sum, "onnx::ReduceSum", data=b.op(sq, "onnx::Mul", A=x, B=x), axes=axes, keepdims=1)
    inv = b.op(inverse, "onnx::Reciprocal", X=b.op(norm, "onnx::Sqrt", X=ss))
    return b.op(out, "onnx::Mul", A=x, B=min2(b, inv, b.param("cap", np.float32(cap)), capped))


def _axes(axis, rank) -> list[int]:
    """A layer's ``axis`` (one or several, negative or not) as sorted axes of a rank-``rank`` input."""
    return sorted(a % rank for a in (axis if isinstance(axis, (list, tuple)) else [axis]))


@translator("Normalization")
def _normalization(layer, b, xs):
    if layer.invert:
        b.unsupported("invert=True")
    mean = np.asarray(layer.mean, np.float32)
    var = np.asarray(layer.variance, np.float32)
    m = b.param("mean", mean)
    v = b.param("variance", var)
    eps = b.param("epsilon", np.float32(1e-7))
    sd = max2(b, b.op("sqrt", "onnx::Sqrt", X=v), eps, "std")
    return b.op("normalized", "onnx::Div", A=b.op("centered", "onnx::Sub", A=xs[0], B=m), B=sd)


@translator("Rescaling")
def _rescaling(layer, b, xs):
    scale = b.param("scale", np.asarray(layer.scale, np.float32))
    offset = b.param("offset", np.asarray(layer.offset, np.float32))
    y = b.op("scaled", "onnx::Mul", A=xs[0], B=scale)
    return b.op("shifted", "onnx::Add", A=y, B=offset)
