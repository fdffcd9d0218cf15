"""Attention layers: Attention (dot-product) and MultiHeadAttention."""

from __future__ import annotations

import numpy as np

from .registry import translator, weights


def _attend(b, q, k, v, scale=None, tag=""):
    """softmax(q @ k^T [* scale]) @ v over the last two axes."""
    kt = b.op(f"{tag}k_t", "onnx::Transpose", data=k, perm=[0, 2, 1] if "h" not in tag else [0, 1, 3, 2])
    scores = b.op(f"{tag}scores", "onnx::MatMul", A=q, B=kt)
    if scale is not None:
        scores = b.op(f"{tag}scaled", "onnx::Mul", A=scores, B=scale)
    weights_ = b.op(f"{tag}weights", "onnx::Softmax", input=scores, axis=-1)
    return b.op(f"{tag}attended", "onnx::MatMul", A=weights_, B=v)


def _refuse_masks(layer, b, n_inputs):
    kw = b.call_kwargs
    if kw.get("use_causal_mask") or kw.get("return_attention_scores"):
        b.unsupported("use_causal_mask / return_attention_scores")
    if len(b.in_shapes) > n_inputs or kw.get("attention_mask") is not None or kw.get("mask") is not None:
        b.unsupported("attention masks")


@translator("Attention")
def _attention(layer, b, xs):
    """Luong dot-product attention: [query, value(, key)]."""
    _refuse_masks(layer, b, 3)
    if layer.score_mode != "dot":
        b.unsupported(f"score_mode={layer.score_mode!r} (dot only)")
    q, v = xs[0], xs[1]
    k = xs[2] if len(xs) > 2 else v
    scale = b.param("scale", np.asarray(weights(layer)["scale"], np.float32)) if layer.use_scale else None
    return _attend(b, q, k, v, scale)


def _project_heads(b, x, dense, name, heads, d):
    """(N, T, F) through one of MultiHeadAttention's EinsumDense projections (kernel
    (F, heads, d)), split into its heads: (N, heads, T, d)."""
    w = weights(dense)
    kernel = w["kernel"]
    y = b.op(f"{name}_proj", "onnx::MatMul", A=x, B=b.param(f"{name}_kernel", kernel.reshape(kernel.shape[0], -1)))
    if "bias" in w:
        y = b.op(f"{name}_biased", "onnx::Add", A=y, B=b.param(f"{name}_bias", w["bias"].reshape(-1)))
    y = b.op(f"{name}_heads", "onnx::Reshape", data=y, shape=[0, 0, heads, d])
    return b.op(f"{name}_h", "onnx::Transpose", data=y, perm=[0, 2, 1, 3])


@translator("MultiHeadAttention")
def _multi_head_attention(layer, b, xs):
    """Keras's MultiHeadAttention on (N, T, F) inputs: the query, key and value projections
    (EinsumDense, kernels (F, heads, dim)), scaled dot-product attention per head over the
    time axis, and the output projection (kernel (heads, dim, F_out))."""
    _refuse_masks(layer, b, 3)
    if any(len(s) != 3 for s in b.in_shapes):
        b.unsupported("inputs other than (batch, steps, features)")
    if layer._attention_axes not in (None, (1,), [1]):
        b.unsupported(f"attention_axes={layer._attention_axes}")
    heads, dim = int(layer.num_heads), int(layer.key_dim)
    vdim = int(layer.value_dim or dim)
    q_in, v_in = xs[0], xs[1]
    k_in = xs[2] if len(xs) > 2 else v_in
    q = _project_heads(b, q_in, layer._query_dense, "query", heads, dim)
    q = b.op("query_scaled", "onnx::Mul", A=q, B=b.param("inv_sqrt_dim", np.float32(1.0 / np.sqrt(dim))))
    k = _project_heads(b, k_in, layer._key_dense, "key", heads, dim)
    v = _project_heads(b, v_in, layer._value_dense, "value", heads, vdim)
    att = _attend(b, q, k, v, tag="h")                                               # (N, heads, T, vdim)
    att = b.op("merged", "onnx::Reshape", data=b.op("att_t", "onnx::Transpose", data=att, perm=[0, 2, 1, 3]),
               shape=[0, 0, heads * vdim])
    w = weights(layer._output_dense)
    kernel = w["kernel"]
    y = b.op("output", "onnx::MatMul", A=att, B=b.param("output_kernel", kernel.reshape(heads * vdim, -1)))
    if "bias" in w:
        y = b.op("output_biased", "onnx::Add", A=y, B=b.param("output_bias", w["bias"]))
    return y
