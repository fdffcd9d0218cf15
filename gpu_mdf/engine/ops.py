"""Kernels for ``onnx::*`` ops and MDF standard functions, one table entry each.

Every kernel is written once against an array module ``xp`` (numpy or cupy) and
is called as ``kernel(xp, *inputs, **attributes)``. ``inputs`` are arrays (or
scalars) in the order the op declares; ``attributes`` are compile-time constants.
Adding an op is one decorated function.

Layouts follow ONNX (NCHW for Conv/pooling); the converter transposes around them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .expr import erf


@dataclass(frozen=True)
class OpSpec:
    name: str
    kernel: Callable
    inputs: tuple[str, ...]                 # positional tensor inputs, ONNX names
    attrs: dict = field(default_factory=dict)  # attribute defaults (compile-time constants)
    variadic: bool = False                  # all args are inputs (Sum, Concat...)
    optional: tuple[str, ...] = ()          # inputs that may be missing
    fresh: bool = False                     # always returns newly allocated memory
    inplace: bool = False                   # kernel accepts inplace=True (may overwrite input 0)
    alias: bool = False                     # returns a view of input 0 (reshape, transpose...)


OPS: dict[str, OpSpec] = {}


def op(name: str, inputs: tuple[str, ...] = ("X",), optional: tuple[str, ...] = (),
       variadic: bool = False, fresh: bool = False, inplace: bool = False, alias: bool = False, **attrs):
    """Register ``kernel`` under ``onnx::NAME`` (or a bare MDF standard name).

    ``fresh``: the result never aliases an input. ``alias``: the result is a view of
    the first input. ``inplace``: the kernel takes ``inplace=True`` and may then reuse
    its first input's memory (the compiler only asks when that memory is a temporary
    of the program that nothing else reads).
    """
    def deco(fn):
        OPS[name] = OpSpec(name, fn, tuple(inputs), dict(attrs), variadic, tuple(optional), fresh, inplace,
                           alias)
        return fn
    return deco


def host(v):
    """A shape-like constant (pads, perm, shape, scales...) as a host NumPy array."""
    if hasattr(v, "get") and not isinstance(v, dict):  # cupy array
        v = v.get()
    return np.asarray(v)


def _scalar(v):
    return None if v is None else host(v).reshape(()).item()


def lookup(function_name: str) -> OpSpec | None:
    """Find an op by MDF function name: ``onnx::Relu``, ``linear``...

    Also accepts the spellings that modeci_mdf's own keras importer writes
    (``onnx:Transpose``, ``onnx::Batchnormalization``).
    """
    name = function_name
    if name.startswith("onnx:"):
        name = "onnx::" + name.split(":")[-1]
    if name in OPS:
        return OPS[name]
    folded = {k.lower(): v for k, v in OPS.items()}
    return folded.get(name.lower())


# ----------------------------------------------------------------------------- #
# Elementwise unary
# ----------------------------------------------------------------------------- #
@op("onnx::Identity", ("input",), alias=True)
def identity(xp, x):
    return x


@op("onnx::Dropout", ("data",), optional=("ratio", "training_mode"), alias=True, seed=None)
def dropout(xp, x, *_, **__):
    return x  # inference: identity


@op("onnx::Relu", fresh=True, inplace=True)
def relu(xp, x, inplace=False):
    return xp.maximum(x, 0, out=x if inplace else None)


@op("onnx::LeakyRelu", alpha=0.01)
def leaky_relu(xp, x, alpha):
    return xp.where(x >= 0, x, x * x.dtype.type(alpha))


@op("onnx::Elu", alpha=1.0)
def elu(xp, x, alpha):
    return xp.where(x > 0, x, x.dtype.type(alpha) * xp.expm1(xp.minimum(x, 0)))


@op("onnx::Selu", alpha=1.67326319217681884765625, gamma=1.05070102214813232421875)
def selu(xp, x, alpha, gamma):
    t = x.dtype.type
    return t(gamma) * xp.where(x > 0, x, t(alpha) * xp.expm1(xp.minimum(x, 0)))


@op("onnx::Sigmoid", fresh=True)
def sigmoid(xp, x):
    # numerically stable for large |x| in float32
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


@op("onnx::HardSigmoid", alpha=0.2, beta=0.5)
def hard_sigmoid(xp, x, alpha, beta):
    t = x.dtype.type
    return xp.clip(x * t(alpha) + t(beta), 0, 1)


@op("onnx::Tanh", ("input",), fresh=True, inplace=True)
def tanh(xp, x, inplace=False):
    return xp.tanh(x, out=x if inplace else None)


@op("onnx::Softplus")
def softplus(xp, x):
    return xp.logaddexp(x, x.dtype.type(0))


@op("onnx::Softsign", ("input",))
def softsign(xp, x):
    return x / (1 + xp.abs(x))


for _name, _fn in {"Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Abs": "abs", "Neg": "negative",
                   "Floor": "floor", "Ceil": "ceil", "Reciprocal": "reciprocal", "Sin": "sin",
                   "Cos": "cos"}.items():
    op(f"onnx::{_name}", ("input",) if _name in ("Exp", "Log", "Sin", "Cos") else ("X",))(
        (lambda f: lambda xp, x: getattr(xp, f)(x))(_fn))


@op("onnx::Erf", ("input",))
def erf_op(xp, x):
    return erf(xp, x)


@op("onnx::Clip", ("input",), optional=("min", "max"))
def clip(xp, x, lo=None, hi=None):
    lo = None if lo is None else x.dtype.type(_scalar(lo))
    hi = None if hi is None else x.dtype.type(_scalar(hi))
    return xp.clip(x, lo, hi)


@op("onnx::Cast", ("input",), to=1)
def cast(xp, x, to):
    onnx_types = {1: np.float32, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64}
    return x.astype(onnx_types[int(to)])


# ----------------------------------------------------------------------------- #
# Elementwise binary / variadic
# ----------------------------------------------------------------------------- #
def _binary(f):
    def kernel(xp, a, b, inplace=False):
        fn = getattr(xp, f)
        # dtypes, not arrays: NumPy must never try to convert a device array
        if inplace and getattr(a, "shape", None) == np.broadcast_shapes(np.shape(a), np.shape(b)) \
                and np.result_type(a.dtype, getattr(b, "dtype", b)) == a.dtype:
            return fn(a, b, out=a)
        return fn(a, b)
    return kernel


for _name, _fn in {"Add": "add", "Sub": "subtract", "Mul": "multiply", "Div": "divide",
                   "Pow": "power"}.items():
    op(f"onnx::{_name}", ("A", "B") if _name != "Pow" else ("X", "Y"), fresh=True, inplace=True)(_binary(_fn))


def _fold(fn):
    def kernel(xp, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(xp, out, x)
        return out
    return kernel


op("onnx::Sum", ("data_0",), variadic=True)(_fold(lambda xp, a, b: a + b))
op("onnx::Max", ("data_0",), variadic=True)(_fold(lambda xp, a, b: xp.maximum(a, b)))
op("onnx::Min", ("data_0",), variadic=True)(_fold(lambda xp, a, b: xp.minimum(a, b)))


@op("onnx::Mean", ("data_0",), variadic=True)
def mean(xp, *xs):
    return _fold(lambda xp, a, b: a + b)(xp, *xs) / len(xs)


@op("onnx::GreaterOrEqual", ("A", "B"))
def greater_or_equal(xp, a, b):
    return a >= b


@op("onnx::Expand", ("input", "shape"))
def expand(xp, x, shape):
    target = [int(v) for v in host(shape).ravel()]
    return xp.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(target)))


@op("onnx::Where", ("condition", "X", "Y"))
def where(xp, c, a, b):
    return xp.where(c, a, b)


# ----------------------------------------------------------------------------- #
# Linear algebra and normalisation
# ----------------------------------------------------------------------------- #
@op("onnx::MatMul", ("A", "B"), fresh=True)
def matmul(xp, a, b):
    return a @ b


@op("onnx::Gemm", ("A", "B"), optional=("C",), fresh=True, alpha=1.0, beta=1.0, transA=0, transB=0)
def gemm(xp, a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    if transA:
        a = a.T
    if transB:
        b = b.T
    y = a @ b  # a fresh array: safe to update in place
    if alpha != 1.0:
        y *= y.dtype.type(alpha)
    if c is not None:
        if beta != 1.0:
            c = c * c.dtype.type(beta)
        y += c
    return y


def _axis(x, axis):
    return axis if axis >= 0 else x.ndim + axis


def _reduce_last(xp, x, how):
    """max/sum over a short last axis. NumPy reduces a 10-wide axis slowly (0.5 ms for
    10k rows); folding column by column (max) or a BLAS product (sum) is 3-4x faster."""
    if xp is np and x.ndim == 2 and x.shape[1] <= 64:
        if how == "sum":
            return x @ np.ones((x.shape[1], 1), x.dtype)
        m = x[:, 0].copy()
        for j in range(1, x.shape[1]):
            np.maximum(m, x[:, j], out=m)
        return m[:, None]
    return x.max(axis=-1, keepdims=True) if how == "max" else x.sum(axis=-1, keepdims=True)


def _shift(xp, x, axis, inplace):
    """x - max(x) along axis, in x's own memory when allowed."""
    last = _axis(x, axis) == x.ndim - 1
    m = _reduce_last(xp, x, "max") if last else x.max(axis=axis, keepdims=True)
    return xp.subtract(x, m, out=x if inplace else None), last


@op("onnx::Softmax", ("input",), fresh=True, inplace=True, axis=-1)
def softmax(xp, x, axis, inplace=False):
    e, last = _shift(xp, x, axis, inplace)
    xp.exp(e, out=e)
    e /= _reduce_last(xp, e, "sum") if last else e.sum(axis=axis, keepdims=True)
    return e


@op("onnx::LogSoftmax", ("input",), fresh=True, inplace=True, axis=-1)
def log_softmax(xp, x, axis, inplace=False):
    s, last = _shift(xp, x, axis, inplace)
    e = xp.exp(s)
    s -= xp.log(_reduce_last(xp, e, "sum") if last else e.sum(axis=axis, keepdims=True))
    return s


@op("onnx::BatchNormalization", ("X", "scale", "B", "input_mean", "input_var"),
    epsilon=1e-5, momentum=0.9, training_mode=0)
def batch_norm(xp, x, scale, b, mean, var, epsilon, momentum=None, training_mode=0):
    shape = (1, -1) + (1,) * (x.ndim - 2)  # channel axis 1
    t = x.dtype.type
    inv = (scale / xp.sqrt(var + t(epsilon))).astype(x.dtype, copy=False)
    return x * inv.reshape(shape) + (b - mean * inv).astype(x.dtype, copy=False).reshape(shape)


@op("onnx::LayerNormalization", ("X", "Scale"), optional=("B",), axis=-1, epsilon=1e-5, stash_type=1)
def layer_norm(xp, x, scale, b=None, axis=-1, epsilon=1e-5, stash_type=1):
    axes = tuple(range(_axis(x, axis), x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    d = x - mu
    var = (d * d).mean(axis=axes, keepdims=True)
    y = d / xp.sqrt(var + x.dtype.type(epsilon)) * scale
    return y if b is None else y + b


# ----------------------------------------------------------------------------- #
# Shape ops
# ----------------------------------------------------------------------------- #
@op("onnx::Flatten", ("input",), alias=True, axis=1)
def flatten(xp, x, axis):
    axis = _axis(x, axis)
    return x.reshape((int(np.prod(x.shape[:axis])), -1))


@op("onnx::Reshape", ("data", "shape"), alias=True, allowzero=0)
def reshape(xp, x, shape, allowzero=0):
    shape = [int(s) for s in host(shape).ravel()]
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("onnx::Transpose", ("data",), alias=True, perm=None)
def transpose(xp, x, perm):
    return xp.transpose(x, None if perm is None else [int(p) for p in perm])


@op("onnx::Concat", ("inputs",), variadic=True, axis=0)
def concat(xp, *xs, axis):
    return xp.concatenate(xs, axis=int(axis))


@op("onnx::Pad", ("data", "pads"), optional=("constant_value",), mode="constant")
def pad(xp, x, pads, constant_value=None, mode="constant"):
    p = [int(v) for v in host(pads).ravel()]
    n = x.ndim
    width = [(p[i], p[i + n]) for i in range(n)]
    if mode == "constant":
        cv = 0 if constant_value is None else _scalar(constant_value)
        return xp.pad(x, width, mode="constant", constant_values=cv)
    return xp.pad(x, width, mode={"reflect": "reflect", "edge": "edge"}[mode])


@op("onnx::Slice", ("data", "starts", "ends"), optional=("axes", "steps"))
def slice_(xp, x, starts, ends, axes=None, steps=None):
    starts = [int(v) for v in host(starts).ravel()]
    ends = [int(v) for v in host(ends).ravel()]
    axes = range(len(starts)) if axes is None else [int(v) for v in host(axes).ravel()]
    steps = [1] * len(starts) if steps is None else [int(v) for v in host(steps).ravel()]
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a] = slice(s, e, st)
    return x[tuple(index)]


@op("onnx::Resize", ("X",), optional=("roi", "scales", "sizes"), mode="nearest",
    coordinate_transformation_mode="asymmetric", nearest_mode="floor")
def resize(xp, x, roi=None, scales=None, sizes=None, **attrs):
    """Nearest-neighbour upsampling by integer scales (what UpSampling2D emits)."""
    scales = [int(round(float(s))) for s in host(scales).ravel()]
    for axis, s in enumerate(scales):
        if s != 1:
            x = xp.repeat(x, s, axis=axis)
    return x


# ----------------------------------------------------------------------------- #
# Convolution and pooling (N, C, *spatial)
# ----------------------------------------------------------------------------- #
def _windows(xp, x, kernel, strides, dilations):
    """View of x (N, C, *S) as (N, C, *out, *kernel) sliding windows."""
    nsp = len(kernel)
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    swv = xp.lib.stride_tricks.sliding_window_view
    w = swv(x, span, axis=tuple(range(2, 2 + nsp)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dilations)
    return w[index]


def _pad_spatial(xp, x, pads, value=0.0):
    nsp = x.ndim - 2
    if not any(pads):
        return x
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nsp]) for i in range(nsp)]
    return xp.pad(x, width, mode="constant", constant_values=value)


def _conv_defaults(x, kernel_shape, strides, dilations, pads):
    nsp = x.ndim - 2
    strides = list(strides or [1] * nsp)
    dilations = list(dilations or [1] * nsp)
    pads = list(pads or [0] * (2 * nsp))
    return list(kernel_shape), strides, dilations, pads


@op("onnx::Conv", ("X", "W"), optional=("B",), fresh=True, auto_pad="NOTSET", dilations=None, group=1,
    kernel_shape=None, pads=None, strides=None)
def conv(xp, x, w, b=None, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
         pads=None, strides=None):
    """ONNX Conv (NCHW in and out), computed channels-last: im2col rows gather whole
    channel vectors, and the result is an NCHW view of channels-last memory, so the
    transposes a Keras (NHWC) graph puts around it cost nothing."""
    if auto_pad not in ("NOTSET", "VALID"):
        raise ValueError(f"Conv auto_pad={auto_pad} is not supported; give explicit pads")
    kernel, strides, dilations, pads = _conv_defaults(x, kernel_shape or w.shape[2:], strides,
                                                      dilations, pads)
    nsp = len(kernel)
    xl = xp.moveaxis(x, 1, -1)                                   # (N, *S, C)
    if any(pads):
        xl = xp.pad(xl, [(0, 0)] + [(pads[i], pads[i + nsp]) for i in range(nsp)] + [(0, 0)])
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    win = xp.lib.stride_tricks.sliding_window_view(xl, span, axis=tuple(range(1, 1 + nsp)))
    win = win[(slice(None),) + tuple(slice(None, None, s) for s in strides) + (slice(None),)
              + tuple(slice(None, None, d) for d in dilations)]     # (N, *out, C, *k)
    n, out_sp, c = win.shape[0], win.shape[1:1 + nsp], win.shape[1 + nsp]
    perm = (0,) + tuple(range(1, 1 + nsp)) + tuple(range(2 + nsp, 2 + 2 * nsp)) + (1 + nsp,)
    win = xp.transpose(win, perm)                                  # (N, *out, *k, C)
    g, f = int(group), w.shape[0]
    cg, fg = c // g, f // g
    rows = n * int(np.prod(out_sp))
    outs = []
    for gi in range(g):
        part = win[..., gi * cg:(gi + 1) * cg] if g > 1 else win
        cols = xp.ascontiguousarray(part).reshape(rows, -1)
        wg = w[gi * fg:(gi + 1) * fg]                              # (fg, cg, *k)
        wm = xp.transpose(wg, tuple(range(2, 2 + nsp)) + (1, 0)).reshape(-1, fg)
        outs.append(cols @ wm)
    y = outs[0] if g == 1 else xp.concatenate(outs, axis=1)
    if b is not None:
        y += b
    return xp.moveaxis(y.reshape((n,) + tuple(out_sp) + (f,)), -1, 1)


def _pool(xp, x, kernel_shape, strides, pads, dilations, pad_value):
    kernel, strides, dilations, pads = _conv_defaults(x, kernel_shape, strides, dilations, pads)
    xpad = _pad_spatial(xp, x, pads, pad_value)
    win = _windows(xp, xpad, kernel, strides, dilations)
    axes = tuple(range(x.ndim, win.ndim))
    return win, axes, (kernel, strides, dilations, pads)


@op("onnx::MaxPool", ("X",), auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=None,
    pads=None, storage_order=0, strides=None)
def max_pool(xp, x, kernel_shape, strides=None, pads=None, dilations=None, **_):
    win, axes, _ = _pool(xp, x, kernel_shape, strides, pads, dilations, -np.inf)
    return win.max(axis=axes)


@op("onnx::AveragePool", ("X",), auto_pad="NOTSET", ceil_mode=0, count_include_pad=0,
    dilations=None, kernel_shape=None, pads=None, strides=None)
def average_pool(xp, x, kernel_shape, strides=None, pads=None, count_include_pad=0,
                 dilations=None, **_):
    win, axes, (kernel, strides, dilations, pads) = _pool(xp, x, kernel_shape, strides, pads, dilations, 0.0)
    total = win.sum(axis=axes)
    if count_include_pad or not any(pads):
        return total / x.dtype.type(np.prod(kernel))
    ones = xp.ones((1, 1) + x.shape[2:], dtype=x.dtype)
    cwin = _windows(xp, _pad_spatial(xp, ones, pads, 0.0), kernel, strides, dilations)
    return total / cwin.sum(axis=axes)


@op("onnx::GlobalAveragePool")
def global_average_pool(xp, x):
    return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)


@op("onnx::GlobalMaxPool")
def global_max_pool(xp, x):
    return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)


def _fold_small_axes(xp, x, axes, keepdims, combine):
    """Reduce over a few short axes (e.g. the 2x2 tiles of a pooling) by combining
    strided slices: NumPy's reduction over short interleaved axes is 2x slower."""
    if axes is None or not axes:
        return None
    axes = sorted(int(a) % x.ndim for a in axes)
    count = int(np.prod([x.shape[a] for a in axes]))
    if count > 16 or count < 2 or xp is not np:
        return None
    out = None
    for idx in np.ndindex(*[x.shape[a] for a in axes]):
        sl = [slice(None)] * x.ndim
        for a, i in zip(axes, idx):
            sl[a] = i
        v = x[tuple(sl)]
        out = v.copy() if out is None else combine(out, v, out=out)
    if keepdims:
        out = xp.expand_dims(out, tuple(axes))
    return out, count


@op("onnx::ReduceMean", ("data",), axes=None, keepdims=1)
def reduce_mean(xp, x, axes=None, keepdims=1):
    folded = _fold_small_axes(xp, x, axes, keepdims, np.add)
    if folded is not None:
        out, count = folded
        out /= x.dtype.type(count)
        return out
    return x.mean(axis=None if axes is None else tuple(int(a) for a in axes), keepdims=bool(keepdims))


@op("onnx::ReduceMax", ("data",), axes=None, keepdims=1)
def reduce_max(xp, x, axes=None, keepdims=1):
    folded = _fold_small_axes(xp, x, axes, keepdims, np.maximum)
    if folded is not None:
        return folded[0]
    return x.max(axis=None if axes is None else tuple(int(a) for a in axes), keepdims=bool(keepdims))


# ----------------------------------------------------------------------------- #
# MDF standard functions (modeci_mdf.functions.standard), same formulas
# ----------------------------------------------------------------------------- #
_S0 = "variable0"
_STANDARD = {
    "linear": ((_S0, "slope", "intercept"), lambda xp, v, slope, intercept: v * slope + intercept),
    "logistic": ((_S0, "gain", "bias", "offset"),
                 lambda xp, v, gain, bias, offset: 1 / (1 + xp.exp(-1 * gain * (v + bias) + offset))),
    "exponential": ((_S0, "scale", "rate", "bias", "offset"),
                    lambda xp, v, scale, rate, bias, offset: scale * xp.exp((rate * v) + bias) + offset),
    "MatMul": (("A", "B"), lambda xp, a, b: a @ b),
    "Relu": (("A",), lambda xp, a: a * (a > 0)),
}
for _trig in ("sin", "cos", "tan", "sinh", "cosh", "tanh", "arctan", "arcsin", "arccos"):
    _STANDARD[_trig] = ((_S0, "scale"), (lambda f: lambda xp, v, scale: scale * getattr(xp, f)(v))(_trig))
for _name, (_inputs, _fn) in _STANDARD.items():
    op(_name, _inputs)(_fn)
