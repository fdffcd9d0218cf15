"""Reshaping layers: Flatten, Reshape, Permute, RepeatVector, ZeroPadding2D, Cropping2D."""

from __future__ import annotations

from .registry import spatial_sizes, translator


@translator("Flatten")
def _flatten(layer, b, xs):
    x, rank = xs[0], len(b.in_shapes[0])
    if getattr(layer, "data_format", "channels_last") == "channels_first" and rank > 2:
        x = b.to_channels_last(x, rank)       # Keras switches to channels-last before flattening
    return b.op("flatten", "onnx::Flatten", input=x, axis=1)


@translator("Reshape")
def _reshape(layer, b, xs):
    return b.op("reshape", "onnx::Reshape", data=xs[0], shape=[0] + [int(s) for s in layer.target_shape])


@translator("Permute")
def _permute(layer, b, xs):
    return b.op("permute", "onnx::Transpose", data=xs[0], perm=[0] + [int(d) for d in layer.dims])


@translator("RepeatVector")
def _repeat_vector(layer, b, xs):
    f = b.in_shapes[0][1]
    y = b.op("row", "onnx::Reshape", data=xs[0], shape=[0, 1, f])
    return b.op("repeated", "onnx::Expand", input=y, shape=[1, int(layer.n), 1])


@translator("ZeroPadding2D")
def _zero_pad(layer, b, xs):
    (t, bt), (lf, r) = layer.padding
    if layer.data_format == "channels_last":
        pads = [0, t, lf, 0, 0, bt, r, 0]
    else:
        pads = [0, 0, t, lf, 0, 0, bt, r]
    return b.op("pad", "onnx::Pad", data=xs[0], pads=pads)


@translator("Cropping2D")
def _crop(layer, b, xs):
    (t, bt), (lf, r) = layer.cropping
    h, w = spatial_sizes(layer, b.in_shapes[0], 2)
    axes = [1, 2] if layer.data_format == "channels_last" else [2, 3]
    return b.op("crop", "onnx::Slice", data=xs[0], starts=[t, lf], ends=[h - bt, w - r], axes=axes)
