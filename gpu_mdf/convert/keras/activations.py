"""Activation functions (by Keras name) and the activation layers (Activation, ReLU,
LeakyReLU, ELU, Softmax)."""

from __future__ import annotations

from functools import partial

import numpy as np

from .registry import ACTIVATIONS, REFUSED_ACTIVATIONS, NodeBuilder, activation, min2, translator


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


def single_op(b, x, name: str, **attrs) -> str:
    """Apply a one-op activation; ``attrs`` override its defaults (e.g. a layer's alpha)."""
    op, arg, defaults = SINGLE_OP_ACTIVATIONS[name]
    return b.op(name, f"onnx::{op}", **{arg: x}, **{**defaults, **attrs})


for _name in SINGLE_OP_ACTIVATIONS:
    activation(_name)(partial(single_op, name=_name))


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
    """The Keras name of an activation function (a layer's ``activation``)."""
    name = getattr(fn, "__name__", None) or str(fn)
    return {"softmax_v2": "softmax"}.get(name, name)   # tf.keras's name for softmax


def apply_activation(b: NodeBuilder, x: str, fn) -> str:
    """The activation function ``fn`` applied to the value ``x``; refused by name where unsupported."""
    name = activation_name(fn)
    if name in REFUSED_ACTIVATIONS:
        b.unsupported(f"activation {name!r} ({REFUSED_ACTIVATIONS[name]})")
    if name not in ACTIVATIONS:
        b.unsupported(f"activation {name!r} (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name](b, x)


# --------------------------------------------------------------------------- #
# Activation layers
# --------------------------------------------------------------------------- #
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
        y = min2(b, y, b.param("max_value", np.float32(mx)), "capped")
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
