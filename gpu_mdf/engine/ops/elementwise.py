"""Elementwise ops: activations, arithmetic, comparisons, logic, casts."""

from __future__ import annotations

import numpy as np

from ..expr import erf
from . import FLOAT, INT, STRING, Attr, OpError, op, scalar, weight_form

# --------------------------------------------------------------------------- #
# Unary, no attributes: ONNX name -> (input name, function of (xp, x))
# --------------------------------------------------------------------------- #
_UNARY = {
    "Abs": ("X", lambda xp, x: xp.abs(x)),
    "Neg": ("X", lambda xp, x: xp.negative(x)),
    "Exp": ("input", lambda xp, x: xp.exp(x)),
    "Log": ("input", lambda xp, x: xp.log(x)),
    "Sqrt": ("X", lambda xp, x: xp.sqrt(x)),
    "Reciprocal": ("X", lambda xp, x: xp.reciprocal(x)),
    "Floor": ("X", lambda xp, x: xp.floor(x)),
    "Ceil": ("X", lambda xp, x: xp.ceil(x)),
    "Round": ("X", lambda xp, x: xp.round(x)),          # half to even, as ONNX
    "Sign": ("input", lambda xp, x: xp.sign(x)),
    "Sin": ("input", lambda xp, x: xp.sin(x)),
    "Cos": ("input", lambda xp, x: xp.cos(x)),
    "Tan": ("input", lambda xp, x: xp.tan(x)),
    "Asin": ("input", lambda xp, x: xp.arcsin(x)),
    "Acos": ("input", lambda xp, x: xp.arccos(x)),
    "Atan": ("input", lambda xp, x: xp.arctan(x)),
    "Sinh": ("input", lambda xp, x: xp.sinh(x)),
    "Cosh": ("input", lambda xp, x: xp.cosh(x)),
    "Asinh": ("input", lambda xp, x: xp.arcsinh(x)),
    "Acosh": ("input", lambda xp, x: xp.arccosh(x)),
    "Atanh": ("input", lambda xp, x: xp.arctanh(x)),
    "Erf": ("input", lambda xp, x: erf(xp, x)),
    "Softsign": ("input", lambda xp, x: x / (1 + xp.abs(x))),
    "Softplus": ("X", lambda xp, x: xp.logaddexp(x, x.dtype.type(0))),
    "Not": ("X", lambda xp, x: xp.logical_not(x)),
    "IsNaN": ("X", lambda xp, x: xp.isnan(x)),
    "HardSwish": ("X", lambda xp, x: x * xp.clip(x / x.dtype.type(6) + x.dtype.type(0.5), 0, 1)),
    "Mish": ("X", lambda xp, x: x * xp.tanh(xp.logaddexp(x, x.dtype.type(0)))),
}
for _name, (_arg, _fn) in _UNARY.items():
    op(f"onnx::{_name}", (_arg,), outputs=("output",) if _arg == "input" else ("Y",),
       fresh=True)((lambda f: lambda xp, x: f(xp, x))(_fn))


@op("onnx::Identity", ("input",), outputs=("output",), alias=True)
def identity(xp, x):
    return x


@op("onnx::Relu", fresh=True, inplace=True)
def relu(xp, x, inplace=False):
    return xp.maximum(x, 0, out=x if inplace else None)


@op("onnx::Tanh", ("input",), outputs=("output",), fresh=True, inplace=True)
def tanh(xp, x, inplace=False):
    return xp.tanh(x, out=x if inplace else None)


@op("onnx::Sigmoid", fresh=True)
def sigmoid(xp, x):
    e = xp.exp(-xp.abs(x))           # numerically stable for large |x| in float32
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


@op("onnx::LeakyRelu", attrs={"alpha": Attr(FLOAT, 0.01)}, fresh=True)
def leaky_relu(xp, x, alpha):
    return xp.where(x >= 0, x, x * x.dtype.type(alpha))


@op("onnx::Elu", attrs={"alpha": Attr(FLOAT, 1.0)}, fresh=True)
def elu(xp, x, alpha):
    return xp.where(x > 0, x, x.dtype.type(alpha) * xp.expm1(xp.minimum(x, 0)))


@op("onnx::Celu", attrs={"alpha": Attr(FLOAT, 1.0)}, fresh=True)
def celu(xp, x, alpha):
    t = x.dtype.type
    return xp.maximum(x, 0) + xp.minimum(0, t(alpha) * xp.expm1(xp.minimum(x, 0) / t(alpha)))


@op("onnx::Selu", attrs={"alpha": Attr(FLOAT, 1.67326319217681884765625),
                         "gamma": Attr(FLOAT, 1.05070102214813232421875)}, fresh=True)
def selu(xp, x, alpha, gamma):
    t = x.dtype.type
    return t(gamma) * xp.where(x > 0, x, t(alpha) * xp.expm1(xp.minimum(x, 0)))


@op("onnx::HardSigmoid", attrs={"alpha": Attr(FLOAT, 0.2), "beta": Attr(FLOAT, 0.5)}, fresh=True)
def hard_sigmoid(xp, x, alpha, beta):
    t = x.dtype.type
    return xp.clip(x * t(alpha) + t(beta), 0, 1)


@op("onnx::ThresholdedRelu", attrs={"alpha": Attr(FLOAT, 1.0)}, fresh=True)
def thresholded_relu(xp, x, alpha):
    return xp.where(x > x.dtype.type(alpha), x, x.dtype.type(0))


@op("onnx::Shrink", ("input",), outputs=("output",), attrs={"bias": Attr(FLOAT, 0.0), "lambd": Attr(FLOAT, 0.5)},
    fresh=True)
def shrink(xp, x, bias, lambd):
    t = x.dtype.type
    return xp.where(x < t(-lambd), x + t(bias), xp.where(x > t(lambd), x - t(bias), t(0)))


def _check_gelu(a):
    if a["approximate"] not in ("none", "tanh"):
        raise OpError(f"Gelu approximate={a['approximate']!r} (expected 'none' or 'tanh')")


@op("onnx::Gelu", attrs={"approximate": Attr(STRING, "none")}, fresh=True, check=_check_gelu)
def gelu(xp, x, approximate):
    t = x.dtype.type
    if approximate == "tanh":
        inner = t(np.sqrt(2 / np.pi)) * (x + t(0.044715) * x * x * x)
        return t(0.5) * x * (1 + xp.tanh(inner))
    return t(0.5) * x * (1 + erf(xp, x * t(1 / np.sqrt(2))))


@op("onnx::IsInf", attrs={"detect_negative": Attr(INT, 1), "detect_positive": Attr(INT, 1)}, fresh=True)
def is_inf(xp, x, detect_negative, detect_positive):
    if detect_negative and detect_positive:
        return xp.isinf(x)
    if detect_positive:
        return x == x.dtype.type(np.inf)
    if detect_negative:
        return x == x.dtype.type(-np.inf)
    return xp.zeros(x.shape, bool)


@op("onnx::PRelu", ("X", "slope"), fresh=True, since=7)
def prelu(xp, x, slope):
    return xp.where(x < 0, x * slope, x)


@op("onnx::PRelu", ("X", "slope"), fresh=True, until=6)
def prelu_6(xp, x, slope):
    """Before opset 7 a slope of one value per channel applies along axis 1 (PyTorch's
    PReLU, exported that way)."""
    if slope.ndim == 1 and x.ndim > 2 and slope.shape[0] == x.shape[1] > 1:
        slope = slope.reshape((-1,) + (1,) * (x.ndim - 2))
    return prelu(xp, x, slope)


# --------------------------------------------------------------------------- #
# Binary arithmetic, comparison, logic
# --------------------------------------------------------------------------- #
_TILE = 2048     # inner-loop length NumPy needs to run at memory speed


def _tiled_trailing(xp, a, b):
    """NumPy broadcasting a short vector along the last axis of ``a`` (a bias, a
    per-channel scale with few channels) runs an inner loop per row of that length: 4x
    slow for 16 channels. The same operation on ``a`` seen as rows of ``k * len(b)``
    values and ``b`` tiled ``k`` times runs at memory speed. Returns (a view, tiled b: made
    once for a constant ``b``) or None where it does not apply."""
    if xp is not np or b.ndim == 0 or a.ndim < 2 or not a.flags.c_contiguous:
        return None
    c = a.shape[-1]
    if b.shape[-1] != c or any(d != 1 for d in b.shape[:-1]) or c >= _TILE or b.dtype != a.dtype:
        return None
    k = max(1, _TILE // c)
    rows = a.size // c
    while rows % k:
        k //= 2
    if k < 4:
        return None
    return a.reshape(-1, k * c), weight_form(b, f"tiled {k}", lambda: np.tile(b.reshape(-1), k))


def add_trailing(xp, a, b, inplace=False):
    """``a + b`` for ``b`` broadcast along ``a``'s last axis (a bias), in place when allowed."""
    t = _tiled_trailing(xp, a, b)
    if t is not None:
        a2, b2 = t
        return xp.add(a2, b2, out=a2 if inplace else None).reshape(a.shape)
    return xp.add(a, b, out=a if inplace else None)


def _binary(f):
    def kernel(xp, a, b, inplace=False):
        fn = getattr(xp, f)
        # dtypes and shapes, not arrays: NumPy must never try to convert a device array
        own = inplace and isinstance(a, xp.ndarray) and a.shape == np.broadcast_shapes(a.shape, b.shape) \
            and np.result_type(a.dtype, b.dtype) == a.dtype
        t = _tiled_trailing(xp, a, b) if a.ndim >= b.ndim else None
        if t is not None:
            a2, b2 = t
            return fn(a2, b2, out=a2 if own else None).reshape(a.shape)
        return fn(a, b, out=a) if own else fn(a, b)
    return kernel


for _name, _fn in {"Add": "add", "Sub": "subtract", "Mul": "multiply"}.items():
    # before opset 7: `broadcast` and `axis` attributes (a different broadcasting)
    op(f"onnx::{_name}", ("A", "B"), outputs=("C",), fresh=True, inplace=True, since=7)(_binary(_fn))


@op("onnx::Div", ("A", "B"), outputs=("C",), fresh=True, inplace=True, since=7)
def div(xp, a, b, inplace=False):
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":
        # ONNX integer division truncates toward zero (NumPy's // floors)
        q = xp.floor_divide(a, b)
        return q + ((q < 0) & (q * b != a)).astype(q.dtype)
    return _binary("divide")(xp, a, b, inplace)


@op("onnx::Pow", ("X", "Y"), outputs=("Z",), fresh=True, since=7)
def pow_(xp, x, y):
    """ONNX: the result has the base's type (an integer base with a float exponent too)."""
    if x.dtype.kind == "f" and y.dtype != x.dtype:
        y = y.astype(x.dtype)
    z = xp.power(x, y)
    return z if z.dtype == x.dtype else z.astype(x.dtype)


@op("onnx::Mod", ("A", "B"), outputs=("C",), attrs={"fmod": Attr(INT, 0)}, fresh=True, since=10, until=27)
def mod_10(xp, a, b, fmod):
    if not fmod and (a.dtype.kind == "f" or b.dtype.kind == "f"):
        raise OpError("Mod with fmod=0 is defined for integers only before opset 28; use fmod=1 for floats")
    return mod(xp, a, b, fmod)


@op("onnx::Mod", ("A", "B"), outputs=("C",), attrs={"fmod": Attr(INT, 0)}, fresh=True, since=28)
def mod(xp, a, b, fmod):
    """fmod=1: C's fmod (the sign of A); fmod=0: A - floor(A / B) * B (the sign of B), floats included."""
    return xp.fmod(a, b) if fmod else xp.mod(a, b)


for _name, _fn in {"Equal": "equal", "Greater": "greater", "Less": "less", "GreaterOrEqual": "greater_equal",
                   "LessOrEqual": "less_equal", "And": "logical_and", "Or": "logical_or",
                   "Xor": "logical_xor"}.items():
    op(f"onnx::{_name}", ("A", "B"), outputs=("C",), fresh=True, since=7)(
        (lambda f: lambda xp, a, b: getattr(xp, f)(a, b))(_fn))


def _fold(fn):
    def kernel(xp, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(xp, out, x)
        return out
    return kernel


op("onnx::Sum", ("data_0",), outputs=("sum",), variadic=True)(_fold(lambda xp, a, b: a + b))
op("onnx::Max", ("data_0",), outputs=("max",), variadic=True)(_fold(lambda xp, a, b: xp.maximum(a, b)))
op("onnx::Min", ("data_0",), outputs=("min",), variadic=True)(_fold(lambda xp, a, b: xp.minimum(a, b)))


@op("onnx::Mean", ("data_0",), outputs=("mean",), variadic=True, fresh=True)
def mean(xp, *xs):
    s = _fold(lambda xp, a, b: a + b)(xp, *xs)
    return s / s.dtype.type(len(xs))


@op("onnx::Where", ("condition", "X", "Y"), outputs=("output",), fresh=True)
def where(xp, c, a, b):
    return xp.where(c, a, b)


@op("onnx::Clip", ("input",), optional=("min", "max"), outputs=("output",),
    static=("min", "max"), attrs={"min": Attr(FLOAT), "max": Attr(FLOAT)}, fresh=True, inplace=True, since=6)
def clip(xp, x, lo_in=None, hi_in=None, min=None, max=None, inplace=False):  # noqa: A002 - ONNX attribute names
    """Opset 11+ takes the bounds as inputs; opset 6 as attributes (either, not both)."""
    if lo_in is not None and min is not None or hi_in is not None and max is not None:
        raise OpError("Clip: a bound given both as input and as attribute")
    lo = scalar(lo_in) if lo_in is not None else min
    hi = scalar(hi_in) if hi_in is not None else max
    t = x.dtype.type
    return xp.clip(x, None if lo is None else t(lo), None if hi is None else t(hi), out=x if inplace else None)


# --------------------------------------------------------------------------- #
# Casts
# --------------------------------------------------------------------------- #
ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
               9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def _check_cast(a):
    if a["to"] not in ONNX_DTYPES:
        raise OpError(f"Cast to ONNX type {a['to']} (strings, bfloat16, float8 and complex are not supported)")


@op("onnx::Cast", ("input",), outputs=("output",), attrs={"to": Attr(INT, 1), "saturate": Attr(INT, 1)}, since=6,
    check=_check_cast, alias=True)
def cast(xp, x, to, saturate):
    # saturate only concerns float8 targets, which are refused
    return x.astype(ONNX_DTYPES[to], copy=False)


@op("onnx::CastLike", ("input", "target_type"), outputs=("output",), attrs={"saturate": Attr(INT, 1)}, alias=True)
def cast_like(xp, x, like, saturate):
    return x.astype(like.dtype, copy=False)
