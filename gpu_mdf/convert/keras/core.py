"""Core layers: Dense, Embedding, the layers that are the identity at inference
(Dropout, noise, regularisation), and the TimeDistributed wrapper."""

from __future__ import annotations

import numpy as np

from .activations import apply_activation
from .registry import TRANSLATORS, translator, weights


@translator("Dense")
def _dense(layer, b, xs):
    w = weights(layer)
    if getattr(layer, "lora_enabled", False) or "kernel" not in w:
        b.unsupported("this Dense configuration (LoRA or quantised)")
    k = b.param("kernel", w["kernel"])
    if len(b.in_shapes[0]) == 2 and "bias" in w:
        y = b.op("gemm", "onnx::Gemm", A=xs[0], B=k, C=b.param("bias", w["bias"]))
    else:
        y = b.op("matmul", "onnx::MatMul", A=xs[0], B=k)
        if "bias" in w:
            y = b.op("add_bias", "onnx::Add", A=y, B=b.param("bias", w["bias"]))
    return apply_activation(b, y, layer.activation)


@translator("Embedding")
def _embedding(layer, b, xs):
    """Rows of the embedding matrix by id. An id outside [0, input_dim) makes that position
    NaN (never another row), so the item's output is not finite and gpu-mdf reports it
    as an error of that item."""
    if getattr(layer, "mask_zero", False):
        b.unsupported("mask_zero=True (masking)")
    w = weights(layer)
    if "embeddings" not in w:
        b.unsupported("this Embedding configuration (LoRA or quantised)")
    table = w["embeddings"]
    ids = b.op("ids", "onnx::Cast", input=xs[0], to=7)                       # int64
    lo, hi = b.param("lo", np.int64(0)), b.param("hi", np.int64(table.shape[0] - 1))
    bad = b.op("bad", "onnx::Or", A=b.op("below", "onnx::Less", A=ids, B=lo),
               B=b.op("above", "onnx::Greater", A=ids, B=hi))
    safe = b.op("safe_ids", "onnx::Where", condition=bad, X=lo, Y=ids)
    rows = b.op("rows", "onnx::Gather", data=b.param("embeddings", table), indices=safe, axis=0)
    bad_b = b.op("bad_b", "onnx::Unsqueeze", data=bad, axes=[-1])
    return b.op("embedded", "onnx::Where", condition=bad_b, X=b.param("nan", np.float32("nan")), Y=rows)


@translator("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
            "GaussianDropout", "AlphaDropout", "ActivityRegularization")
def _identity_at_inference(layer, b, xs):
    return b.op("identity", "onnx::Identity", input=xs[0])


@translator("TimeDistributed")
def _time_distributed(layer, b, xs):
    """The inner layer on (N*T, ...) (a reshape), then back to (N, T, ...)."""
    inner = layer.layer
    fn = TRANSLATORS.get(type(inner).__name__)
    if fn is None:
        b.unsupported(f"TimeDistributed({type(inner).__name__})")
    shape = b.in_shapes[0]
    if any(d is None for d in shape[1:]):
        b.unsupported("an input with an unknown size")
    steps = int(shape[1])
    inner_in = (None,) + tuple(shape[2:])
    inner_out = tuple(inner.compute_output_shape(inner_in))
    if any(d is None for d in inner_out[1:]):
        b.unsupported(f"TimeDistributed({type(inner).__name__}) with an output of unknown size")
    flat = b.op("merged_steps", "onnx::Reshape", data=xs[0], shape=[-1] + [int(d) for d in shape[2:]])
    saved = (b.layer, b.in_shapes)
    b.layer, b.in_shapes = inner, [inner_in]
    try:
        y = fn(inner, b, [flat])
    finally:
        b.layer, b.in_shapes = saved
    if not isinstance(y, str):
        b.unsupported(f"TimeDistributed({type(inner).__name__}) with several outputs")
    return b.op("split_steps", "onnx::Reshape", data=y, shape=[-1, steps] + [int(d) for d in inner_out[1:]])
