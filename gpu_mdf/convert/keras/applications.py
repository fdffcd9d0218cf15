"""Layers of keras.applications' models (ConvNeXt's LayerScale and StochasticDepth,
InceptionResNetV2's CustomScaleLayer) and the position embedding of gpu_mdf.layers and
keras_hub, each translated only for those classes themselves."""

from __future__ import annotations

import numpy as np

from .registry import translator, weights


def _application_layer(layer) -> bool:
    """A layer class of keras.applications itself (not a user's class of the same name)."""
    return type(layer).__module__.startswith("keras.src.applications.")


@translator("LayerScale")
def _layer_scale(layer, b, xs):          # ConvNeXt: x * gamma, per channel
    if not _application_layer(layer):
        b.unsupported("a custom layer named LayerScale (only keras.applications' own)")
    return b.op("scaled", "onnx::Mul", A=xs[0], B=b.param("gamma", np.asarray(layer.gamma.numpy())))


@translator("StochasticDepth")
def _stochastic_depth(layer, b, xs):     # ConvNeXt: identity at inference
    if not _application_layer(layer):
        b.unsupported("a custom layer named StochasticDepth (only keras.applications' own)")
    return b.op("identity", "onnx::Identity", input=xs[0])


@translator("CustomScaleLayer")
def _custom_scale(layer, b, xs):         # InceptionResNetV2: inputs[0] + inputs[1] * scale
    if not _application_layer(layer):
        b.unsupported("a custom layer named CustomScaleLayer (only keras.applications' own)")
    scaled = b.op("scaled", "onnx::Mul", A=xs[1], B=b.param("scale", np.float32(layer.scale)))
    return b.op("sum", "onnx::Add", A=xs[0], B=scaled)


@translator("PositionEmbedding")
def _position_embedding(layer, b, xs):
    """gpu_mdf.layers.PositionEmbedding / keras_hub.layers.PositionEmbedding: the first T rows
    of the learned table, broadcast to the input's shape (N, ..., T, F)."""
    module = type(layer).__module__
    if not (module == "gpu_mdf.layers" or module.startswith("keras_hub.")):
        b.unsupported("a custom layer named PositionEmbedding (only gpu_mdf.layers' and keras_hub's)")
    start = b.call_kwargs.get("start_index", 0)
    if not isinstance(start, int) or start != 0:
        b.unsupported(f"start_index={start!r} (0 only)")
    shape = b.in_shapes[0]
    if len(shape) < 3 or shape[-2] is None or shape[-1] is None:
        b.unsupported(f"input shape {shape} (needs (batch, ..., steps, features), steps and features known)")
    table = weights(layer)["embeddings"][: int(shape[-2])]
    dims = b.op("input_shape", "onnx::Shape", data=xs[0])
    return b.op("positions", "onnx::Expand", input=b.param("embeddings", table), shape=dims)
