"""Resizing layers: Resizing and UpSampling2D."""

from __future__ import annotations

import numpy as np

from .registry import spatial_sizes, translator


def _resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """(n_out, n_in) weights of TensorFlow's resize along one axis (half-pixel centres, no
    antialiasing): bilinear mixes the two nearest inputs, nearest picks one."""
    a = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        if method == "nearest":
            a[i, min(int(np.floor((i + 0.5) * scale)), n_in - 1)] = 1.0
            continue
        src = (i + 0.5) * scale - 0.5
        f = np.floor(src)
        lo, hi, w = int(max(f, 0)), int(min(np.ceil(src), n_in - 1)), src - f
        a[i, lo] += 1 - w
        a[i, hi] += w
    return a.astype(np.float32)


def _resize(layer, b, x, out_h: int, out_w: int, method: str):
    """Resize as two matrix products, A_h @ image @ A_w^T on (N, C, H, W): ops that
    modeci_mdf's EvaluableGraph runs (its Resize does not)."""
    if method not in ("bilinear", "nearest"):
        b.unsupported(f"interpolation={method!r} (bilinear and nearest only)")
    cl = layer.data_format == "channels_last"
    h, w = spatial_sizes(layer, b.in_shapes[0], 2)
    if h is None or w is None:
        b.unsupported("an image of unknown size")
    y = b.to_channels_first(x, 4) if cl else x
    y = b.op("rows", "onnx::MatMul", A=b.param("resize_h", _resize_matrix(h, out_h, method)), B=y)
    y = b.op("cols", "onnx::MatMul", A=y, B=b.param("resize_w_t", _resize_matrix(w, out_w, method).T.copy()))
    return b.to_channels_last(y, 4) if cl else y


@translator("Resizing")
def _resizing(layer, b, xs):
    if layer.crop_to_aspect_ratio or layer.pad_to_aspect_ratio:
        b.unsupported("crop_to_aspect_ratio / pad_to_aspect_ratio")
    if getattr(layer, "antialias", False):
        b.unsupported("antialias=True")
    return _resize(layer, b, xs[0], int(layer.height), int(layer.width), layer.interpolation)


@translator("UpSampling2D")
def _upsample(layer, b, xs):
    """Nearest-neighbour upsampling as reshape + broadcast + reshape:
    (N, H, W, C) -> (N, H, 1, W, 1, C) -> (N, H, sh, W, sw, C) -> (N, H*sh, W*sw, C);
    bilinear as resize matrices."""
    sh, sw = (int(v) for v in layer.size)
    if layer.interpolation != "nearest":
        h, w = spatial_sizes(layer, b.in_shapes[0], 2)
        return _resize(layer, b, xs[0], h * sh, w * sw, layer.interpolation)
    if layer.data_format == "channels_last":
        _, h, w, c = b.in_shapes[0]
        split, reps, final = [0, h, 1, w, 1, c], [1, 1, sh, 1, sw, 1], [0, h * sh, w * sw, c]
    else:
        _, c, h, w = b.in_shapes[0]
        split, reps, final = [0, c, h, 1, w, 1], [1, 1, 1, sh, 1, sw], [0, c, h * sh, w * sw]
    y = b.op("split", "onnx::Reshape", data=xs[0], shape=split)
    y = b.op("repeat", "onnx::Expand", input=y, shape=reps)
    return b.op("upsampled", "onnx::Reshape", data=y, shape=final)
