"""Keras layer -> MDF node translators, one small function per layer kind.

Each Keras layer call becomes one MDF node whose input ports receive the layer's
input tensors and whose one output port gives its result. Inside the node the
computation is a chain of MDF functions from the vocabulary modeci_mdf's
``EvaluableGraph`` understands: ``onnx::*`` ops (ONNX layouts, so channels-last
tensors are transposed around Conv/pooling) and plain arithmetic expressions.
Weights are node parameters stored exactly as Keras holds them (float32, Keras
layout); any re-layout is an MDF function that the gpu-mdf engine folds once.

The graph input is an MDF input port per model input (shape ``(1, ...)`` with
``metadata.batch_axis = 0``: the batch axis is free); no data lives in the file.

Adding a layer kind = one function decorated with ``@translator("ClassName")``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import UnsupportedLayerError

TRANSLATORS: dict[str, Callable] = {}
ACTIVATIONS: dict[str, Callable] = {}


def translator(*class_names: str):
    def deco(fn):
        for name in class_names:
            TRANSLATORS[name] = fn
        return fn
    return deco


def activation(*names: str):
    def deco(fn):
        for name in names:
            ACTIVATIONS[name] = fn
        return fn
    return deco


def supported_layers() -> list[str]:
    return sorted(TRANSLATORS)


# --------------------------------------------------------------------------- #
# Node builder
# --------------------------------------------------------------------------- #
@dataclass
class NodeBuilder:
    """Collects one MDF node's parameters and functions with unique local ids."""

    id: str
    layer: object
    in_shapes: list[tuple]            # Keras shapes of the inputs, batch axis None
    parameters: list = field(default_factory=list)    # (id, value)
    functions: list = field(default_factory=list)     # (id, function | None, args | None, value | None)
    reserved: set = field(default_factory=set)        # ids taken already (the node's input ports)

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.reserved:
            i += 1
            name = f"{base}{i}"
        self.reserved.add(name)
        return name

    def param(self, base: str, value) -> str:
        name = self._fresh(base)
        self.parameters.append((name, value))
        return name

    def op(self, base: str, function: str, **args) -> str:
        name = self._fresh(base)
        self.functions.append((name, function, args, None))
        return name

    def expr(self, base: str, value: str) -> str:
        name = self._fresh(base)
        self.functions.append((name, None, None, value))
        return name

    def unsupported(self, what: str):
        raise UnsupportedLayerError(
            f"layer {self.layer.name!r} ({type(self.layer).__name__}): {what} is not supported")

    # layout helpers for channels-last layers
    def to_channels_first(self, x: str, rank: int) -> str:
        perm = [0, rank - 1] + list(range(1, rank - 1))
        return self.op("nchw", "onnx::Transpose", data=x, perm=perm)

    def to_channels_last(self, x: str, rank: int) -> str:
        perm = [0] + list(range(2, rank)) + [1]
        return self.op("nhwc", "onnx::Transpose", data=x, perm=perm)


def weights(layer) -> dict[str, np.ndarray]:
    """The layer's weights by short name (kernel, bias, gamma...), as float32 NumPy."""
    out = {}
    for v in layer.weights:
        name = v.path.split("/")[-1] if hasattr(v, "path") else v.name.split("/")[-1].split(":")[0]
        out[name] = np.asarray(v.numpy())
    return out


def _same_pads(in_sizes, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    """TensorFlow 'same' padding: extra pixel at the end."""
    before, after = [], []
    for n, k, s, d in zip(in_sizes, kernel, strides, dilations):
        if n is None:
            raise UnsupportedLayerError("'same' padding needs a static spatial size")
        out = -(-n // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        before.append(total // 2)
        after.append(total - total // 2)
    return before, after


def _tuple(v, n):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


# Binary forms of max/min/sum: modeci_mdf's EvaluableGraph feeds *every* value of a
# node into a variadic ONNX op (Max, Min, Sum, Mean), so those are avoided.
def _max2(b, a, c, name="max"):
    return b.op(name, "onnx::Where", condition=b.op(f"{name}_ge", "onnx::GreaterOrEqual", A=a, B=c), X=a, Y=c)


def _min2(b, a, c, name="min"):
    return b.op(name, "onnx::Where", condition=b.op(f"{name}_ge", "onnx::GreaterOrEqual", A=c, B=a), X=a, Y=c)


def _fold(b, xs, fn, name):
    y = xs[0]
    for x in xs[1:]:
        y = fn(b, y, x, name)
    return y


# --------------------------------------------------------------------------- #
# Activations (by Keras name)
# --------------------------------------------------------------------------- #
@activation("linear")
def _linear(b, x):
    return x


# Activations that are one ONNX op on their input: name -> (op, input argument, attributes).
SINGLE_OP_ACTIVATIONS = {
    "relu": ("Relu", "X", {}),
    "relu6": ("Clip", "input", {"min": 0.0, "max": 6.0}),
    "sigmoid": ("Sigmoid", "X", {}),
    "hard_sigmoid": ("HardSigmoid", "X", {"alpha": 1.0 / 6.0, "beta": 0.5}),  # Keras 3: relu6(x + 3) / 6
    "tanh": ("Tanh", "input", {}),
    "softmax": ("Softmax", "input", {"axis": -1}),
    "log_softmax": ("LogSoftmax", "input", {"axis": -1}),
    "elu": ("Elu", "X", {"alpha": 1.0}),
    "selu": ("Selu", "X", {"alpha": 1.6732632423543772, "gamma": 1.0507009873554805}),
    "softplus": ("Softplus", "X", {}),
    "softsign": ("Softsign", "input", {}),
    "exponential": ("Exp", "input", {}),
    "leaky_relu": ("LeakyRelu", "X", {"alpha": 0.2}),  # Keras 3's default negative slope
}


def single_op(b, x, name: str, **attrs) -> str:
    """Apply a one-op activation; ``attrs`` override its defaults (e.g. a layer's alpha)."""
    op, arg, defaults = SINGLE_OP_ACTIVATIONS[name]
    return b.op(name, f"onnx::{op}", **{arg: x}, **{**defaults, **attrs})


for _name in SINGLE_OP_ACTIVATIONS:
    activation(_name)((lambda n: lambda b, x: single_op(b, x, n))(_name))


@activation("swish", "silu")
def _swish(b, x):
    s = b.op("sigmoid", "onnx::Sigmoid", X=x)
    return b.op("swish", "onnx::Mul", A=x, B=s)


@activation("gelu")
def _gelu(b, x):  # Keras default: exact, 0.5 x (1 + erf(x / sqrt 2))
    c = b.param("inv_sqrt2", np.float32(1 / np.sqrt(2)))
    e = b.op("erf", "onnx::Erf", input=b.op("scaled", "onnx::Mul", A=x, B=c))
    return b.expr("gelu", f"0.5 * {x} * (1 + {e})")


@activation("mish")
def _mish(b, x):
    t = b.op("tanh", "onnx::Tanh", input=b.op("softplus", "onnx::Softplus", X=x))
    return b.op("mish", "onnx::Mul", A=x, B=t)


def activation_name(fn) -> str:
    name = getattr(fn, "__name__", None) or str(fn)
    return {"softmax_v2": "softmax", "silu": "silu"}.get(name, name)


def apply_activation(b: NodeBuilder, x: str, fn) -> str:
    name = activation_name(fn)
    if name not in ACTIVATIONS:
        b.unsupported(f"activation {name!r} (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name](b, x)


# --------------------------------------------------------------------------- #
# Layers
# --------------------------------------------------------------------------- #
@translator("Flatten")
def _flatten(layer, b, xs):
    if getattr(layer, "data_format", "channels_last") == "channels_first" and len(b.in_shapes[0]) > 2:
        b.unsupported("data_format='channels_first'")
    return b.op("flatten", "onnx::Flatten", input=xs[0], axis=1)


@translator("Reshape")
def _reshape(layer, b, xs):
    return b.op("reshape", "onnx::Reshape", data=xs[0], shape=[0] + [int(s) for s in layer.target_shape])


@translator("Permute")
def _permute(layer, b, xs):
    return b.op("permute", "onnx::Transpose", data=xs[0], perm=[0] + [int(d) for d in layer.dims])


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


@translator("Activation")
def _activation_layer(layer, b, xs):
    return apply_activation(b, xs[0], layer.activation)


@translator("ReLU")
def _relu_layer(layer, b, xs):
    """f(x) = min(max_value, x >= threshold ? x : negative_slope * (x - threshold))."""
    mx, slope, th = layer.max_value, float(layer.negative_slope), float(layer.threshold)
    x = xs[0]
    if th == 0.0 and slope == 0.0:
        y = b.op("relu", "onnx::Relu", X=x)
    elif th == 0.0:
        y = b.op("leaky_relu", "onnx::LeakyRelu", X=x, alpha=slope)
    else:
        t = b.param("threshold", np.float32(th))
        below = b.op("below", "onnx::Mul", A=b.op("shifted", "onnx::Sub", A=x, B=t),
                     B=b.param("negative_slope", np.float32(slope)))
        y = b.op("relu", "onnx::Where", condition=b.op("above", "onnx::GreaterOrEqual", A=x, B=t),
                 X=x, Y=below)
    if mx is not None:
        y = _min2(b, y, b.param("max_value", np.float32(mx)), "capped")
    return y


@translator("LeakyReLU")
def _leaky_relu_layer(layer, b, xs):
    return single_op(b, xs[0], "leaky_relu", alpha=float(layer.negative_slope))


@translator("ELU")
def _elu_layer(layer, b, xs):
    return single_op(b, xs[0], "elu", alpha=float(layer.alpha))


@translator("Softmax")
def _softmax_layer(layer, b, xs):
    axis = layer.axis
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            b.unsupported(f"softmax over several axes {axis}")
        axis = axis[0]
    return single_op(b, xs[0], "softmax", axis=int(axis))


@translator("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
            "GaussianDropout", "AlphaDropout", "ActivityRegularization")
def _identity_at_inference(layer, b, xs):
    return b.op("identity", "onnx::Identity", input=xs[0])


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
    eps = b.param("epsilon", np.float32(layer.epsilon))
    inv = b.op("inv", "onnx::Div", A=gamma,
               B=b.op("std", "onnx::Sqrt", X=b.op("var_eps", "onnx::Add", A=var, B=eps)))
    shift = b.op("shift", "onnx::Sub", A=beta, B=b.op("mean_inv", "onnx::Mul", A=mean, B=inv))
    if axis != rank - 1:  # broadcast over the axes after the channel axis
        shape = [c] + [1] * (rank - 1 - axis)
        inv = b.op("inv_b", "onnx::Reshape", data=inv, shape=shape)
        shift = b.op("shift_b", "onnx::Reshape", data=shift, shape=shape)
    return b.op("batchnorm", "onnx::Add", A=b.op("scaled", "onnx::Mul", A=xs[0], B=inv), B=shift)


@translator("LayerNormalization")
def _layer_norm(layer, b, xs):
    """Keras's own algebra: inv = gamma / sqrt(var + eps); y = (x - mean) * inv + beta,
    with mean and var over the normalised axes (ReduceMean, opset 15 form)."""
    rank = len(b.in_shapes[0])
    axes = sorted(a % rank for a in (layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]))
    if getattr(layer, "rms_scaling", False):
        b.unsupported("rms_scaling=True")
    w = weights(layer)
    x = xs[0]
    mean = b.op("mean", "onnx::ReduceMean", data=x, axes=axes, keepdims=1)
    d = b.op("centered", "onnx::Sub", A=x, B=mean)
    var = b.op("variance", "onnx::ReduceMean", data=b.op("squared", "onnx::Mul", A=d, B=d), axes=axes,
               keepdims=1)
    std = b.op("std", "onnx::Sqrt", X=b.op("var_eps", "onnx::Add", A=var,
                                           B=b.param("epsilon", np.float32(layer.epsilon))))
    y = b.op("normalized", "onnx::Div", A=d, B=std)
    # gamma/beta have the normalised axes' shape; broadcast them over the others
    bshape = [b.in_shapes[0][a] if a in axes else 1 for a in range(axes[0], rank)]
    if "gamma" in w:
        g = b.op("gamma_b", "onnx::Reshape", data=b.param("gamma", w["gamma"]), shape=bshape)
        y = b.op("scaled", "onnx::Mul", A=y, B=g)
    if "beta" in w:
        bt = b.op("beta_b", "onnx::Reshape", data=b.param("beta", w["beta"]), shape=bshape)
        y = b.op("shifted", "onnx::Add", A=y, B=bt)
    return y


def _spatial_pads(layer, b, nsp, kernel, strides, dilations):
    padding = layer.padding
    if padding == "valid":
        return [0] * (2 * nsp)
    in_sp = b.in_shapes[0][1:1 + nsp] if layer.data_format == "channels_last" else b.in_shapes[0][2:]
    if padding == "same":
        before, after = _same_pads(in_sp, kernel, strides, dilations)
        return before + after
    if padding == "causal":
        return [(kernel[0] - 1) * dilations[0]] + [0]
    b.unsupported(f"padding={padding!r}")


def _conv_core(layer, b, x, nsp, k_name, k_shape, groups, bias=None):
    """ONNX Conv of ``x`` (channels first) with the layer's strides, dilation and padding.
    ``k_name`` names a value holding the kernel in Keras layout (k..., cin/groups, filters);
    the transpose to ONNX layout (filters, cin/groups, k...) is folded once by the engine."""
    kernel = tuple(k_shape[:nsp])
    strides = _tuple(layer.strides, nsp)
    dil = _tuple(getattr(layer, "dilation_rate", 1), nsp)
    pads = _spatial_pads(layer, b, nsp, kernel, strides, dil)
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


@translator("Conv1D", "Conv2D")
def _conv(layer, b, xs):
    nsp = 1 if type(layer).__name__ == "Conv1D" else 2
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


@translator("MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D")
def _pool(layer, b, xs):
    nsp = int(type(layer).__name__[-2])
    rank = nsp + 2
    kernel = _tuple(layer.pool_size, nsp)
    strides = _tuple(layer.strides or layer.pool_size, nsp)
    pads = _spatial_pads(layer, b, nsp, kernel, strides, (1,) * nsp)
    cl = layer.data_format == "channels_last"
    is_max = type(layer).__name__.startswith("Max")
    if cl and strides == kernel and not any(pads):
        return _tiled_pool(b, xs[0], kernel, "ReduceMax" if is_max else "ReduceMean")
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
    return _fold(b, slices, _max2, "maxpool")


@translator("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D",
            "GlobalMaxPooling2D")
def _global_pool(layer, b, xs):
    rank = len(b.in_shapes[0])
    axes = list(range(1, rank - 1)) if layer.data_format == "channels_last" else list(range(2, rank))
    kind = "ReduceMean" if "Average" in type(layer).__name__ else "ReduceMax"
    return b.op(kind.lower(), f"onnx::{kind}", data=xs[0], axes=axes, keepdims=int(layer.keepdims))


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
    cl = layer.data_format == "channels_last"
    h, w = b.in_shapes[0][1:3] if cl else b.in_shapes[0][2:4]
    axes = [1, 2] if cl else [2, 3]
    return b.op("crop", "onnx::Slice", data=xs[0], starts=[t, lf], ends=[h - bt, w - r], axes=axes)


@translator("UpSampling2D")
def _upsample(layer, b, xs):
    """Nearest-neighbour upsampling as reshape + broadcast + reshape:
    (N, H, W, C) -> (N, H, 1, W, 1, C) -> (N, H, sh, W, sw, C) -> (N, H*sh, W*sw, C)."""
    if layer.interpolation != "nearest":
        b.unsupported(f"interpolation={layer.interpolation!r} (only 'nearest')")
    sh, sw = (int(v) for v in layer.size)
    if layer.data_format == "channels_last":
        _, h, w, c = b.in_shapes[0]
        split, reps, final = [0, h, 1, w, 1, c], [1, 1, sh, 1, sw, 1], [0, h * sh, w * sw, c]
    else:
        _, c, h, w = b.in_shapes[0]
        split, reps, final = [0, c, h, 1, w, 1], [1, 1, 1, sh, 1, sw], [0, c, h * sh, w * sw]
    y = b.op("split", "onnx::Reshape", data=xs[0], shape=split)
    y = b.op("repeat", "onnx::Expand", input=y, shape=reps)
    return b.op("upsampled", "onnx::Reshape", data=y, shape=final)


@translator("Rescaling")
def _rescaling(layer, b, xs):
    scale = b.param("scale", np.asarray(layer.scale, np.float32))
    offset = b.param("offset", np.asarray(layer.offset, np.float32))
    y = b.op("scaled", "onnx::Mul", A=xs[0], B=scale)
    return b.op("shifted", "onnx::Add", A=y, B=offset)


@translator("Normalization")
def _normalization(layer, b, xs):
    if layer.invert:
        b.unsupported("invert=True")
    mean = np.asarray(layer.mean, np.float32)
    var = np.asarray(layer.variance, np.float32)
    m = b.param("mean", mean)
    v = b.param("variance", var)
    eps = b.param("epsilon", np.float32(1e-7))
    sd = _max2(b, b.op("sqrt", "onnx::Sqrt", X=v), eps, "std")
    return b.op("normalized", "onnx::Div", A=b.op("centered", "onnx::Sub", A=xs[0], B=m), B=sd)


def _add2(b, a, c, name="sum"):
    return b.op(name, "onnx::Add", A=a, B=c)


@translator("Add")
def _add(layer, b, xs):
    return _fold(b, xs, _add2, "sum")


@translator("Subtract")
def _subtract(layer, b, xs):
    return b.op("sub", "onnx::Sub", A=xs[0], B=xs[1])


@translator("Multiply")
def _multiply(layer, b, xs):
    return _fold(b, xs, lambda b, a, c, name: b.op(name, "onnx::Mul", A=a, B=c), "mul")


@translator("Average")
def _average(layer, b, xs):  # Keras: sum, then divide by the count
    return b.op("mean", "onnx::Div", A=_fold(b, xs, _add2, "sum"), B=b.param("count", np.float32(len(xs))))


@translator("Maximum")
def _maximum(layer, b, xs):
    return _fold(b, xs, _max2, "max")


@translator("Minimum")
def _minimum(layer, b, xs):
    return _fold(b, xs, _min2, "min")


@translator("Concatenate")
def _concatenate(layer, b, xs):
    # variadic: the args are named like the node's input ports (the node holds nothing
    # else), so modeci_mdf's EvaluableGraph sees exactly these inputs
    rank = len(b.in_shapes[0])
    return b.op("concat", "onnx::Concat", axis=int(layer.axis) % rank, **{x: x for x in xs})


# --------------------------------------------------------------------------- #
# Graph walk
# --------------------------------------------------------------------------- #
def safe_id(name: str) -> str:
    s = re.sub(r"\W", "_", name)
    return s if re.match(r"[A-Za-z_]", s) else f"n_{s}"
