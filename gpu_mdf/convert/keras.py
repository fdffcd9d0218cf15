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

TRANSLATORS: dict[str, Callable] = {}      # Keras layers, by class name
OP_TRANSLATORS: dict[str, Callable] = {}   # keras.ops operations in a functional graph (x + 3.0), by class name
ACTIVATIONS: dict[str, Callable] = {}
# Layer kinds refused with a reason (rather than "not supported"): they change what other
# layers compute in ways an unmasked MDF graph would silently ignore.
REFUSED_LAYERS = {"Masking": "masking (the masked steps would be computed like any other)"}


def _registrar(table: dict):
    """A decorator factory: ``@reg("A", "B")`` files the function under each name in ``table``."""
    def register(*names: str):
        def deco(fn):
            for name in names:
                table[name] = fn
            return fn
        return deco
    return register


translator = _registrar(TRANSLATORS)      # @translator("Dense")
activation = _registrar(ACTIVATIONS)      # @activation("relu")
op_translator = _registrar(OP_TRANSLATORS)   # @op_translator("Add"): keras.ops calls, below


@dataclass
class Stack:
    """A translator's result made of per-step values (N, 1, ...) joined along ``axis`` by
    the converter in a node of its own (modeci_mdf's EvaluableGraph gives a variadic op
    such as Concat every value of its node, so Concat gets a node that holds only it)."""
    values: list
    axis: int = 1


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
    out_shape: tuple = ()             # Keras shape of the output
    parameters: list = field(default_factory=list)    # (id, value)
    functions: list = field(default_factory=list)     # (id, function | None, args | None, value | None)
    reserved: set = field(default_factory=set)        # ids taken already (the node's input ports)
    memo: dict = field(default_factory=dict)          # values a translator makes once per node
    call_kwargs: dict = field(default_factory=dict)   # the layer call's keyword arguments

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
    "celu": ("Celu", "X", {"alpha": 1.0}),
    "hard_silu": ("HardSwish", "X", {}),              # x * relu6(x + 3) / 6, Keras 3's hard_sigmoid
    "hard_swish": ("HardSwish", "X", {}),
    "hard_tanh": ("Clip", "input", {"min": -1.0, "max": 1.0}),
    "hard_shrink": ("Shrink", "input", {"bias": 0.0, "lambd": 0.5}),   # |x| > 0.5 ? x : 0
    "soft_shrink": ("Shrink", "input", {"bias": 0.5, "lambd": 0.5}),   # x -+ 0.5 beyond +-0.5, else 0
}
# In keras.activations but not usable by name (they need arguments): refused, saying so.
REFUSED_ACTIVATIONS = {"threshold": "needs its threshold and default_value arguments"}


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


@activation("log_sigmoid")
def _log_sigmoid(b, x):   # -softplus(-x)
    return b.op("log_sigmoid", "onnx::Neg", X=b.op("softplus", "onnx::Softplus", X=b.op("neg", "onnx::Neg", X=x)))


@activation("tanh_shrink")
def _tanh_shrink(b, x):
    return b.op("tanh_shrink", "onnx::Sub", A=x, B=b.op("tanh", "onnx::Tanh", input=x))


@activation("squareplus")
def _squareplus(b, x):   # (x + sqrt(x^2 + 4)) / 2, Keras's default b = 4
    r = b.op("root", "onnx::Sqrt", X=b.op("sq4", "onnx::Add", A=b.op("sq", "onnx::Mul", A=x, B=x),
                                           B=b.param("b", np.float32(4))))
    return b.op("squareplus", "onnx::Div", A=b.op("sum", "onnx::Add", A=x, B=r), B=b.param("two", np.float32(2)))


@activation("sparse_sigmoid")
def _sparse_sigmoid(b, x):   # 0 below -1, 1 above 1, (x + 1) / 2 between: a clip of the middle branch
    half = b.op("half", "onnx::Mul", A=b.op("x1", "onnx::Add", A=x, B=b.param("one", np.float32(1))),
                B=b.param("half_c", np.float32(0.5)))
    return b.op("sparse_sigmoid", "onnx::Clip", input=half, min=0.0, max=1.0)


@activation("sparse_plus")
def _sparse_plus(b, x):   # 0 for x <= -1, (x + 1)^2 / 4 for -1 < x < 1, x for x >= 1
    one = b.param("one", np.float32(1))
    x1 = b.op("x1", "onnx::Add", A=x, B=one)
    quad = b.op("quad", "onnx::Mul", A=b.op("sq", "onnx::Mul", A=x1, B=x1), B=b.param("quarter", np.float32(0.25)))
    mid = b.op("mid", "onnx::Where", condition=b.op("lt1", "onnx::Less", A=x, B=one), X=quad, Y=x)
    zero = b.param("zero", np.float32(0))
    return b.op("sparse_plus", "onnx::Where", condition=b.op("le_m1", "onnx::LessOrEqual", A=x,
                                                              B=b.param("minus_one", np.float32(-1))),
                X=zero, Y=mid)


@activation("glu")
def _glu(b, x):   # x1 * sigmoid(x2), the halves of the last axis
    # the size of the axis glu halves: the layer's units or filters, else its input's
    # (Keras's own symbolic output shape of Dense(activation='glu') is not halved)
    size = getattr(b.layer, "units", None) or getattr(b.layer, "filters", None) or b.in_shapes[0][-1]
    if size is None or size % 2:
        b.unsupported(f"glu on an axis of size {size} (needs a known even size)")
    half = size // 2
    x1 = b.op("x1", "onnx::Slice", data=x, starts=[0], ends=[half], axes=[-1])
    x2 = b.op("x2", "onnx::Slice", data=x, starts=[half], ends=[2 * half], axes=[-1])
    return b.op("glu", "onnx::Mul", A=x1, B=b.op("gate", "onnx::Sigmoid", X=x2))


@activation("sparsemax")
def _sparsemax(b, x):
    """Keras's sparsemax over the last axis, without sorting (no TopK, whose two outputs
    modeci_mdf's EvaluableGraph cannot take): for each entry j, c_j = #{i: x_i >= x_j} (its
    rank) and s_j = the sum of those x_i (the cumulative sum at that rank); j is in the
    support when 1 + c_j x_j > s_j; y = max(x - tau, 0).

    tau is what Keras 3 computes (all its backends): (sum over the support of s_j - 1) / k,
    the sum of the cumulative sums, not the paper's (s at rank k - 1) / k; the two agree
    when the support has one entry. The converter reproduces the model, as Keras runs it."""
    xi = b.op("xi", "onnx::Unsqueeze", data=x, axes=[-2])       # (..., 1, n): x_i along the last axis
    xj = b.op("xj", "onnx::Unsqueeze", data=x, axes=[-1])       # (..., n, 1): x_j along the other
    ge = b.op("ge", "onnx::Cast", input=b.op("ge_b", "onnx::GreaterOrEqual", A=xi, B=xj), to=1)
    c = b.op("count", "onnx::ReduceSum", data=ge, axes=[-1], keepdims=0)
    sj = b.op("sums", "onnx::ReduceSum", data=b.op("ge_x", "onnx::Mul", A=ge, B=xi), axes=[-1], keepdims=0)
    one = b.param("one", np.float32(1))
    lhs = b.op("lhs", "onnx::Add", A=one, B=b.op("cx", "onnx::Mul", A=c, B=x))
    support = b.op("support", "onnx::Cast", input=b.op("in_support", "onnx::Greater", A=lhs, B=sj), to=1)
    k = b.op("k", "onnx::ReduceSum", data=support, axes=[-1], keepdims=1)
    total = b.op("total", "onnx::ReduceSum", data=b.op("ss", "onnx::Mul", A=support, B=sj), axes=[-1], keepdims=1)
    tau = b.op("tau", "onnx::Div", A=b.op("total1", "onnx::Sub", A=total, B=one), B=k)
    return b.op("sparsemax", "onnx::Relu", X=b.op("shifted", "onnx::Sub", A=x, B=tau))


def activation_name(fn) -> str:
    name = getattr(fn, "__name__", None) or str(fn)
    return {"softmax_v2": "softmax", "silu": "silu"}.get(name, name)


def apply_activation(b: NodeBuilder, x: str, fn) -> str:
    name = activation_name(fn)
    if name in REFUSED_ACTIVATIONS:
        b.unsupported(f"activation {name!r} ({REFUSED_ACTIVATIONS[name]})")
    if name not in ACTIVATIONS:
        b.unsupported(f"activation {name!r} (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name](b, x)


# --------------------------------------------------------------------------- #
# Layers
# --------------------------------------------------------------------------- #
@translator("Flatten")
def _flatten(layer, b, xs):
    x, rank = xs[0], len(b.in_shapes[0])
    if getattr(layer, "data_format", "channels_last") == "channels_first" and rank > 2:
        x = b.to_channels_last(x, rank)       # Keras switches to channels-last before flattening
    return b.op("flatten", "onnx::Flatten", input=x, axis=1)


@translator("RepeatVector")
def _repeat_vector(layer, b, xs):
    f = b.in_shapes[0][1]
    y = b.op("row", "onnx::Reshape", data=xs[0], shape=[0, 1, f])
    return b.op("repeated", "onnx::Expand", input=y, shape=[1, int(layer.n), 1])


@translator("UnitNormalization")
def _unit_norm(layer, b, xs):
    """x * min(1 / sqrt(sum x^2), 1e12), as Keras's ops.normalize(order=2, epsilon=1e-12)."""
    rank = len(b.in_shapes[0])
    axes = sorted(a % rank for a in (layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]))
    x = xs[0]
    ss = b.op("square_sum", "onnx::ReduceSum", data=b.op("sq", "onnx::Mul", A=x, B=x), axes=axes, keepdims=1)
    inv = b.op("inv_norm", "onnx::Reciprocal", X=b.op("norm", "onnx::Sqrt", X=ss))
    inv = _min2(b, inv, b.param("cap", np.float32(1e12)), "capped")
    return b.op("normalized", "onnx::Mul", A=x, B=inv)


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
    axes = [a for a in range(1, rank + 1) if a != rank - 1]
    mean = b.op("mean", "onnx::ReduceMean", data=x, axes=axes, keepdims=1)
    d = b.op("centered", "onnx::Sub", A=x, B=mean)
    var = b.op("variance", "onnx::ReduceMean", data=b.op("squared", "onnx::Mul", A=d, B=d), axes=axes, keepdims=1)
    inv = b.op("inv", "onnx::Reciprocal", X=b.op("std", "onnx::Sqrt", X=b.op(
        "var_eps", "onnx::Add", A=var, B=b.param("epsilon", np.float32(layer.epsilon)))))
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
    saved = (b.layer, b.in_shapes, b.out_shape)
    b.layer, b.in_shapes, b.out_shape = inner, [inner_in], inner_out
    try:
        y = fn(inner, b, [flat])
    finally:
        b.layer, b.in_shapes, b.out_shape = saved
    if not isinstance(y, str):
        b.unsupported(f"TimeDistributed({type(inner).__name__}) with several outputs")
    return b.op("split_steps", "onnx::Reshape", data=y, shape=[-1, steps] + [int(d) for d in inner_out[1:]])


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
    strides = _tuple(layer.strides, nsp)
    dil = _tuple(layer.dilation_rate, nsp)
    opad = _tuple(layer.output_padding, nsp) if layer.output_padding is not None else (None,) * nsp
    cl = layer.data_format == "channels_last"
    in_sp = b.in_shapes[0][1:1 + nsp] if cl else b.in_shapes[0][2:]
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


# --------------------------------------------------------------------------- #
# Recurrent layers, unrolled over the input's fixed number of steps
# --------------------------------------------------------------------------- #
def _slice_last(b, x, lo, hi, name):
    return b.op(name, "onnx::Slice", data=x, starts=[lo], ends=[hi], axes=[-1])


def _rnn_steps(layer, b, x, kind: str, reverse: bool, tag: str = ""):
    """Run one recurrent layer's cell over the steps of ``x`` (N, T, F); returns the
    outputs h_t (N, 1, units) in processing order and the final states. The input
    projection of all steps is one MatMul; the weights are parameters of the node, stored once."""
    shape = b.in_shapes[0]
    if len(shape) != 3 or shape[1] is None:
        b.unsupported("an input without a fixed number of steps (the time axis is None); "
                      "the MDF graph unrolls the recurrence over a known length")
    steps = int(shape[1])
    cell = layer.cell
    w = weights(cell)
    u = int(cell.units)
    act, rec = cell.activation, cell.recurrent_activation if kind != "simple" else None
    kernel = b.param(f"{tag}kernel", w["kernel"])
    rk = b.param(f"{tag}recurrent_kernel", w["recurrent_kernel"])
    xw = b.op(f"{tag}xw", "onnx::MatMul", A=x, B=kernel)
    bias = w.get("bias")
    rbias = None
    if bias is not None and kind == "gru" and cell.reset_after:
        xw = b.op(f"{tag}xw_b", "onnx::Add", A=xw, B=b.param(f"{tag}input_bias", bias[0]))
        rbias = b.param(f"{tag}recurrent_bias", bias[1])
    elif bias is not None:
        xw = b.op(f"{tag}xw_b", "onnx::Add", A=xw, B=b.param(f"{tag}bias", bias))
    h = c = None
    outs = []
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        # step t as (N, 1, k*units): every step value keeps the time axis, so that the
        # sequence is a Concat of the steps and the last step one Reshape
        xt = b.op(f"{tag}x{t}", "onnx::Slice", data=xw, starts=[t], ends=[t + 1], axes=[1])
        if kind == "simple":
            z = xt if h is None else b.op(f"{tag}z{t}", "onnx::Add", A=xt, B=b.op(f"{tag}hu{t}", "onnx::MatMul",
                                                                                   A=h, B=rk))
            h = apply_activation(b, z, act)
        elif kind == "lstm":
            z = xt if h is None else b.op(f"{tag}z{t}", "onnx::Add", A=xt, B=b.op(f"{tag}hu{t}", "onnx::MatMul",
                                                                                   A=h, B=rk))
            i = apply_activation(b, _slice_last(b, z, 0, u, f"{tag}zi{t}"), rec)
            f = apply_activation(b, _slice_last(b, z, u, 2 * u, f"{tag}zf{t}"), rec)
            g = apply_activation(b, _slice_last(b, z, 2 * u, 3 * u, f"{tag}zc{t}"), act)
            o = apply_activation(b, _slice_last(b, z, 3 * u, 4 * u, f"{tag}zo{t}"), rec)
            ig = b.op(f"{tag}ig{t}", "onnx::Mul", A=i, B=g)
            c = ig if c is None else b.op(f"{tag}c{t}", "onnx::Add", A=b.op(f"{tag}fc{t}", "onnx::Mul", A=f, B=c),
                                          B=ig)
            h = b.op(f"{tag}h{t}", "onnx::Mul", A=o, B=apply_activation(b, c, act))
        else:   # GRU
            x_z, x_r, x_h = (_slice_last(b, xt, k * u, (k + 1) * u, f"{tag}x{n}{t}") for k, n in enumerate("zrh"))
            if cell.reset_after:
                hu = None if h is None else b.op(f"{tag}hu{t}", "onnx::MatMul", A=h, B=rk)
                if rbias is not None:
                    hu = rbias if hu is None else b.op(f"{tag}hub{t}", "onnx::Add", A=hu, B=rbias)
                r_z, r_r, r_h = ((None,) * 3 if hu is None else
                                 (_slice_last(b, hu, k * u, (k + 1) * u, f"{tag}r{n}{t}") for k, n in enumerate("zrh")))
                z = apply_activation(b, x_z if r_z is None else b.op(f"{tag}sz{t}", "onnx::Add", A=x_z, B=r_z), rec)
                r = apply_activation(b, x_r if r_r is None else b.op(f"{tag}sr{t}", "onnx::Add", A=x_r, B=r_r), rec)
                pre = x_h if r_h is None else b.op(f"{tag}sh{t}", "onnx::Add", A=x_h,
                                                   B=b.op(f"{tag}rrh{t}", "onnx::Mul", A=r, B=r_h))
            else:
                if h is None:
                    z, r, pre = apply_activation(b, x_z, rec), None, x_h
                else:
                    rz = b.op(f"{tag}rz{t}", "onnx::MatMul", A=h, B=_slice_rows(b, rk, 0, u, f"{tag}uz"))
                    rr = b.op(f"{tag}rr{t}", "onnx::MatMul", A=h, B=_slice_rows(b, rk, u, 2 * u, f"{tag}ur"))
                    z = apply_activation(b, b.op(f"{tag}sz{t}", "onnx::Add", A=x_z, B=rz), rec)
                    r = apply_activation(b, b.op(f"{tag}sr{t}", "onnx::Add", A=x_r, B=rr), rec)
                    rh = b.op(f"{tag}rh{t}", "onnx::MatMul", A=b.op(f"{tag}rh_in{t}", "onnx::Mul", A=r, B=h),
                              B=_slice_rows(b, rk, 2 * u, 3 * u, f"{tag}uh"))
                    pre = b.op(f"{tag}sh{t}", "onnx::Add", A=x_h, B=rh)
            hh = apply_activation(b, pre, act)
            one_minus_z = b.op(f"{tag}omz{t}", "onnx::Sub", A=b.param(f"{tag}one", np.float32(1)), B=z)
            new = b.op(f"{tag}zhh{t}", "onnx::Mul", A=one_minus_z, B=hh)
            h = new if h is None else b.op(f"{tag}h{t}", "onnx::Add", A=b.op(f"{tag}zh{t}", "onnx::Mul", A=z, B=h),
                                          B=new)
        outs.append(h)
    return outs, ([h, c] if kind == "lstm" else [h])


def _slice_rows(b, rk, lo, hi, name):
    """Columns lo:hi of the recurrent kernel, made once per node."""
    if name not in b.memo:
        b.memo[name] = _slice_last(b, rk, lo, hi, name)
    return b.memo[name]


_RNN_KINDS = {"SimpleRNN": "simple", "LSTM": "lstm", "GRU": "gru"}


@translator("SimpleRNN", "LSTM", "GRU")
def _rnn(layer, b, xs):
    """Unrolled over the steps: return_sequences gives every step's output (in processing
    order, as Keras does with go_backwards), return_state adds the final states."""
    outs, states = _rnn_steps(layer, b, xs[0], _RNN_KINDS[type(layer).__name__], bool(layer.go_backwards))
    states = [_last(b, v, f"state{i}") for i, v in enumerate(states)]
    first = Stack(outs) if layer.return_sequences else states[0]
    return [first, *states] if layer.return_state else first


def _last(b, v, name):
    """(N, 1, units) -> (N, units)."""
    return b.op(name, "onnx::Reshape", data=v, shape=[0, -1])


@translator("Bidirectional")
def _bidirectional(layer, b, xs):
    fw, bw = layer.forward_layer, layer.backward_layer
    kinds = [_RNN_KINDS.get(type(lay).__name__) for lay in (fw, bw)]
    if None in kinds:
        b.unsupported(f"Bidirectional around {type(fw).__name__}/{type(bw).__name__}")
    if layer.return_state:
        b.unsupported("return_state=True on Bidirectional")
    mode = layer.merge_mode
    if mode not in ("concat", "sum", "mul", "ave", None):
        b.unsupported(f"merge_mode={mode!r}")
    if mode is None:
        b.unsupported("merge_mode=None (two outputs)")
    if fw.stateful or bw.stateful:
        b.unsupported("stateful=True")
    f_outs, _ = _rnn_steps(fw, b, xs[0], kinds[0], bool(fw.go_backwards), "fw_")
    b_outs, _ = _rnn_steps(bw, b, xs[0], kinds[1], bool(bw.go_backwards), "bw_")
    uf, ub = int(fw.cell.units), int(bw.cell.units)

    def merge(a, c, i):
        if mode == "sum":
            return b.op(f"merged{i}", "onnx::Add", A=a, B=c)
        if mode == "mul":
            return b.op(f"merged{i}", "onnx::Mul", A=a, B=c)
        if mode == "ave":
            return b.op(f"merged{i}", "onnx::Mul", A=b.op(f"sum{i}", "onnx::Add", A=a, B=c),
                        B=b.param("half", np.float32(0.5)))
        # concat along the features as two exact placements (x @ [I 0] + y @ [0 I]): no Concat
        # in a node that holds other values (see Stack)
        if "place" not in b.memo:
            b.memo["place"] = (b.param("place_fw", np.eye(uf, uf + ub, dtype=np.float32)),
                               b.param("place_bw", np.eye(ub, uf + ub, uf, dtype=np.float32)))
        pf, pb = b.memo["place"]
        return b.op(f"merged{i}", "onnx::Add", A=b.op(f"fw_p{i}", "onnx::MatMul", A=a, B=pf),
                    B=b.op(f"bw_p{i}", "onnx::MatMul", A=c, B=pb))
    if not layer.return_sequences:
        return _last(b, merge(f_outs[-1], b_outs[-1], ""), "merged_last")
    steps = len(f_outs)
    # the backward layer's outputs come in its processing order; Keras flips them back
    f_time = f_outs if not fw.go_backwards else f_outs[::-1]
    b_time = b_outs[::-1] if bw.go_backwards else b_outs
    return Stack([merge(f_time[t], b_time[t], t) for t in range(steps)])


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


@translator("MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
            "AveragePooling3D")
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


@translator("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D",
            "GlobalMaxPooling2D", "GlobalMaxPooling3D")
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
    _, h, w = (b.in_shapes[0][0], *b.in_shapes[0][1:3]) if cl else (None, *b.in_shapes[0][2:4])
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
    if layer.interpolation != "nearest":
        sh, sw = (int(v) for v in layer.size)
        cl = layer.data_format == "channels_last"
        h, w = b.in_shapes[0][1:3] if cl else b.in_shapes[0][2:4]
        return _resize(layer, b, xs[0], h * sh, w * sw, layer.interpolation)
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
        def unit(x, axis, n):
            ss = b.op(f"ss{n}", "onnx::ReduceSum", data=b.op(f"sq{n}", "onnx::Mul", A=x, B=x), axes=[axis],
                      keepdims=1)
            inv = b.op(f"inv{n}", "onnx::Reciprocal", X=b.op(f"norm{n}", "onnx::Sqrt", X=ss))
            return b.op(f"unit{n}", "onnx::Mul", A=x, B=_min2(b, inv, b.param("cap", np.float32(1e7)), f"cap{n}"))
        x1, x2 = unit(x1, axes[0], 1), unit(x2, axes[1], 2)
    if ranks == [2, 2]:
        return b.op("dot", "onnx::ReduceSum", data=b.op("prod", "onnx::Mul", A=x1, B=x2), axes=[1], keepdims=1)
    a = x1 if axes[0] == 2 else b.op("a_t", "onnx::Transpose", data=x1, perm=[0, 2, 1])
    c = x2 if axes[1] == 1 else b.op("b_t", "onnx::Transpose", data=x2, perm=[0, 2, 1])
    return b.op("dot", "onnx::MatMul", A=a, B=c)


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

    def project(x, dense, name, d):
        w = weights(dense)
        kernel = w["kernel"]
        y = b.op(f"{name}_proj", "onnx::MatMul", A=x, B=b.param(f"{name}_kernel", kernel.reshape(kernel.shape[0], -1)))
        if "bias" in w:
            y = b.op(f"{name}_biased", "onnx::Add", A=y, B=b.param(f"{name}_bias", w["bias"].reshape(-1)))
        y = b.op(f"{name}_heads", "onnx::Reshape", data=y, shape=[0, 0, heads, d])
        return b.op(f"{name}_h", "onnx::Transpose", data=y, perm=[0, 2, 1, 3])      # (N, heads, T, d)
    q = project(q_in, layer._query_dense, "query", dim)
    q = b.op("query_scaled", "onnx::Mul", A=q, B=b.param("inv_sqrt_dim", np.float32(1.0 / np.sqrt(dim))))
    k = project(k_in, layer._key_dense, "key", dim)
    v = project(v_in, layer._value_dense, "value", vdim)
    att = _attend(b, q, k, v, tag="h")                                               # (N, heads, T, vdim)
    att = b.op("merged", "onnx::Reshape", data=b.op("att_t", "onnx::Transpose", data=att, perm=[0, 2, 1, 3]),
               shape=[0, 0, heads * vdim])
    w = weights(layer._output_dense)
    kernel = w["kernel"]
    y = b.op("output", "onnx::MatMul", A=att, B=b.param("output_kernel", kernel.reshape(heads * vdim, -1)))
    if "bias" in w:
        y = b.op("output_biased", "onnx::Add", A=y, B=b.param("output_bias", w["bias"]))
    return y


# --------------------------------------------------------------------------- #
# keras.ops operations called on tensors in a functional model (``x + 3.0``,
# ``y * (1 / 6)`` in MobileNetV3's hard sigmoid). Their class names clash with layers
# (ops.numpy.Add vs layers.Add), and their arguments mix tensors and constants, so they
# have translators of their own: ``operands`` are value names, tensors and constants alike.
# --------------------------------------------------------------------------- #
_BINARY_OPS = {"Add": "Add", "Subtract": "Sub", "Multiply": "Mul", "Divide": "Div", "TrueDivide": "Div",
               "Power": "Pow"}


@op_translator(*_BINARY_OPS)
def _binary_op(op, b, operands):
    if len(operands) != 2:
        b.unsupported(f"{type(op).__name__} of {len(operands)} operands")
    name = type(op).__name__
    return b.op(name.lower(), f"onnx::{_BINARY_OPS[name]}", A=operands[0], B=operands[1])


@op_translator("Maximum", "Minimum")
def _max_min_op(op, b, operands):
    if len(operands) != 2:
        b.unsupported(f"{type(op).__name__} of {len(operands)} operands")
    return (_max2 if type(op).__name__ == "Maximum" else _min2)(b, *operands)


@op_translator("Negative")
def _negative_op(op, b, operands):
    return b.op("neg", "onnx::Neg", X=operands[0])


# --------------------------------------------------------------------------- #
# Graph walk
# --------------------------------------------------------------------------- #
def safe_id(name: str) -> str:
    s = re.sub(r"\W", "_", name)
    return s if re.match(r"[A-Za-z_]", s) else f"n_{s}"
