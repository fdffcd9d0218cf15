"""Convolution layers: Conv1D/2D/3D, DepthwiseConv2D, SeparableConv2D, Conv1D/2DTranspose.

ONNX's Conv is channels-first: a channels-last layer's input is transposed to it and
its result back; kernels are stored in Keras layout and re-laid out by an MDF function
that the engine folds once."""

from __future__ import annotations

from .activations import apply_activation
from .registry import as_tuple, spatial_pads, spatial_sizes, translator, weights


def _conv_core(layer, b, x, nsp, k_name, k_shape, groups, bias=None):
    """ONNX Conv of ``x`` (channels first) with the layer's strides, dilation and padding.
    ``k_name`` names a value holding the kernel in Keras layout (k..., cin/groups, filters);
    the transpose to ONNX layout (filters, cin/groups, k...) is folded once by the engine."""
    kernel = tuple(k_shape[:nsp])
    strides = as_tuple(layer.strides, nsp)
    dil = as_tuple(getattr(layer, "dilation_rate", 1), nsp)
    pads = spatial_pads(layer, b, nsp, kernel, strides, dil)
    kt = b.op(f"{k_name}_oihw", "onnx::Transpose", data=k_name, perm=[nsp + 1, nsp] + list(range(nsp)))
    args = dict(X=x, W=kt, kernel_shape=list(kernel), strides=list(strides), dilations=list(dil),
                pads=list(pads), group=int(groups))
    if bias is not None:
        args["B"] = bias
    return b.op("conv", "onnx::Conv", **args)


def _channels_first(layer, b, xs, rank, body):
    """Run ``body`` on the input in channels-first layout, then the layer's activation."""
    cl = layer.data_format == "channels_last"
    y = body(b.to_channels_first(xs[0], rank) if cl else xs[0])
    return apply_activation(b, b.to_channels_last(y, rank) if cl else y, layer.activation)


@translator("Conv1D", "Conv2D", "Conv3D")
def _conv(layer, b, xs):
    nsp = int(type(layer).__name__[-2])
    w = weights(layer)
    bias = b.param("bias", w["bias"]) if "bias" in w else None
    k = b.param("kernel", w["kernel"])
    return _channels_first(layer, b, xs, nsp + 2,
                           lambda x: _conv_core(layer, b, x, nsp, k, w["kernel"].shape, layer.groups, bias))


def _depthwise_as_grouped(b, name, kernel):
    """Keras depthwise kernel (kh, kw, cin, m) as a grouped-conv kernel (kh, kw, 1, cin*m):
    returns (value name, its shape, groups)."""
    kh, kw, cin, m = kernel.shape
    k = b.param(name, kernel)
    shape = (kh, kw, 1, cin * m)
    return b.op(f"{name}_grouped", "onnx::Reshape", data=k, shape=list(shape)), shape, cin


@translator("DepthwiseConv2D")
def _depthwise(layer, b, xs):
    w = weights(layer)
    k, shape, groups = _depthwise_as_grouped(b, "kernel", w["kernel"])
    bias = b.param("bias", w["bias"]) if "bias" in w else None
    return _channels_first(layer, b, xs, 4, lambda x: _conv_core(layer, b, x, 2, k, shape, groups, bias))


@translator("SeparableConv2D")
def _separable(layer, b, xs):
    w = weights(layer)
    k, shape, groups = _depthwise_as_grouped(b, "depthwise_kernel", w["depthwise_kernel"])

    def body(x):
        y = _conv_core(layer, b, x, 2, k, shape, groups)
        pk = b.op("pointwise_oihw", "onnx::Transpose", data=b.param("pointwise_kernel", w["pointwise_kernel"]),
                  perm=[3, 2, 0, 1])
        args = dict(X=y, W=pk, kernel_shape=[1, 1])
        if "bias" in w:
            args["B"] = b.param("bias", w["bias"])
        return b.op("pointwise", "onnx::Conv", **args)
    return _channels_first(layer, b, xs, 4, body)


@translator("Conv1DTranspose", "Conv2DTranspose")
def _conv_transpose(layer, b, xs):
    """ONNX ConvTranspose with TensorFlow's output size and padding: the output length is
    Keras's (``deconv_output_length``); the pads are those of the forward 'same'/'valid'
    convolution that length would have, the rest is output_padding (added at the end)."""
    nsp = 1 if type(layer).__name__ == "Conv1DTranspose" else 2
    w = weights(layer)
    kernel = tuple(w["kernel"].shape[:nsp])
    strides = as_tuple(layer.strides, nsp)
    dil = as_tuple(layer.dilation_rate, nsp)
    opad = as_tuple(layer.output_padding, nsp) if layer.output_padding is not None else (None,) * nsp
    in_sp = spatial_sizes(layer, b.in_shapes[0], nsp)
    if layer.padding not in ("same", "valid") or any(n is None for n in in_sp):
        b.unsupported(f"padding={layer.padding!r} or an unknown spatial size")
    begin, end, extra = [], [], []
    for n, k, s, d, op_ in zip(in_sp, kernel, strides, dil, opad):
        keff = (k - 1) * d + 1
        if layer.padding == "valid":   # Keras's output length (its TensorFlow padding rules)
            out = (n - 1) * s + keff + (max(keff, s) - keff if op_ is None else op_)
        else:
            out = n * s if op_ is None else (n - 1) * s + keff % 2 + op_
        total = max((n - 1) * s + keff - out, 0)
        begin.append(total // 2)
        end.append(total - total // 2)
        extra.append(out - ((n - 1) * s + keff - total))
    k = b.param("kernel", w["kernel"])                    # Keras (k..., filters, in): ONNX wants (in, filters, k...)
    kt = b.op("kernel_iohw", "onnx::Transpose", data=k, perm=[nsp + 1, nsp] + list(range(nsp)))

    def body(x):
        args = dict(X=x, W=kt, kernel_shape=list(kernel), strides=list(strides), dilations=list(dil),
                    pads=begin + end, output_padding=extra)
        if "bias" in w:
            args["B"] = b.param("bias", w["bias"])
        return b.op("conv_transpose", "onnx::ConvTranspose", **args)
    return _channels_first(layer, b, xs, nsp + 2, body)
