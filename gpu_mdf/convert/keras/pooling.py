"""Pooling layers: max and average pooling (1D, 2D, 3D) and their global forms."""

from __future__ import annotations

import numpy as np

from .registry import as_tuple, fold, max2, spatial_pads, translator


@translator("MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
            "AveragePooling3D")
def _pool(layer, b, xs):
    nsp = int(type(layer).__name__[-2])
    rank = nsp + 2
    kernel = as_tuple(layer.pool_size, nsp)
    strides = as_tuple(layer.strides or layer.pool_size, nsp)
    pads = spatial_pads(layer, b, nsp, kernel, strides, (1,) * nsp)
    cl = layer.data_format == "channels_last"
    is_max = type(layer).__name__.startswith("Max")
    if cl and strides == kernel and not any(pads):
        return _tiled_pool(b, xs[0], kernel, "ReduceMax" if is_max else "ReduceMean")
    # (the channels-first input is made before the channels-last max branch, which does not
    # use it: an unused Transpose its nodes have always held, kept so that the files stay as they were)
    x = b.to_channels_first(xs[0], rank) if cl else xs[0]
    args = dict(X=x, kernel_shape=list(kernel), strides=list(strides), pads=list(pads))
    if is_max and cl:
        return _sliced_max_pool(b, xs[0], kernel, strides, pads)
    if is_max:
        y = b.op("maxpool", "onnx::MaxPool", **args)
    else:
        y = b.op("avgpool", "onnx::AveragePool", count_include_pad=0, **args)
    return b.to_channels_last(y, rank) if cl else y


def _tiled_pool(b, x, kernel, reduce_op):
    """Non-overlapping pooling on channels-last input as crop + reshape + reduce:
    (N, H, W, C) -> (N, H/p, p, W/q, q, C) -> reduce over the p, q axes. Exact, and
    runs in modeci_mdf's EvaluableGraph (whose MaxPool returns a tuple)."""
    spatial = b.in_shapes[0][1:-1]
    keep = [(n // k) * k for n, k in zip(spatial, kernel)]
    if list(keep) != list(spatial):
        x = b.op("crop", "onnx::Slice", data=x, starts=[0] * len(keep), ends=keep,
                 axes=list(range(1, len(keep) + 1)))
    shape = [0]
    for n, k in zip(keep, kernel):
        shape += [n // k, k]
    shape.append(b.in_shapes[0][-1])
    tiles = b.op("tiles", "onnx::Reshape", data=x, shape=shape)
    axes = [2 + 2 * i for i in range(len(kernel))]
    return b.op(reduce_op.lower(), f"onnx::{reduce_op}", data=tiles, axes=axes, keepdims=0)


def _sliced_max_pool(b, x, kernel, strides, pads):
    """Max pooling on channels-last input as the max of kernel-many strided slices
    (after padding with the lowest float32): no window copies, and it runs in
    modeci_mdf's EvaluableGraph, whose MaxPool returns a tuple."""
    nsp = len(kernel)
    spatial = list(b.in_shapes[0][1:1 + nsp])
    if any(pads):
        lo = float(np.finfo(np.float32).min)
        full = [0] + list(pads[:nsp]) + [0] + [0] + list(pads[nsp:]) + [0]
        x = b.op("padded", "onnx::Pad", data=x, pads=full, constant_value=b.param("lowest", np.float32(lo)))
        spatial = [n + pads[i] + pads[i + nsp] for i, n in enumerate(spatial)]
    out = [(n - k) // s + 1 for n, k, s in zip(spatial, kernel, strides)]
    slices = []
    for offset in np.ndindex(*kernel):
        ends = [o + (m - 1) * s + 1 for o, m, s in zip(offset, out, strides)]
        slices.append(b.op("window", "onnx::Slice", data=x, starts=list(map(int, offset)), ends=ends,
                           axes=list(range(1, nsp + 1)), steps=list(strides)))
    return fold(b, slices, max2, "maxpool")


@translator("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D",
            "GlobalMaxPooling2D", "GlobalMaxPooling3D")
def _global_pool(layer, b, xs):
    rank = len(b.in_shapes[0])
    axes = list(range(1, rank - 1)) if layer.data_format == "channels_last" else list(range(2, rank))
    kind = "ReduceMean" if "Average" in type(layer).__name__ else "ReduceMax"
    return b.op(kind.lower(), f"onnx::{kind}", data=xs[0], axes=axes, keepdims=int(layer.keepdims))
