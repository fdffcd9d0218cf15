"""MDF standard functions (``modeci_mdf.functions.standard``), with the same formulas.

Their arguments are tensors (an argument a file leaves out is looked up by name in
the node, as modeci_mdf does); they have no attributes. A literal takes the float type
of the value it meets (:func:`~gpu_mdf.engine.expr.weak`): on NumPy 1.x a Python number
beside a 0-d float32 array made float64 (NumPy 2 keeps float32).
"""

from __future__ import annotations

from ..expr import weak
from . import op

_S0 = "variable0"


def _logistic(xp, v, gain, bias, offset):
    one, e = weak(1, xp.exp(-gain * (v + bias) + offset))
    return one / (one + e)

_STANDARD = {
    "linear": ((_S0, "slope", "intercept"), lambda xp, v, slope, intercept: v * slope + intercept),
    "logistic": ((_S0, "gain", "bias", "offset"), _logistic),
    "exponential": ((_S0, "scale", "rate", "bias", "offset"),
                    lambda xp, v, scale, rate, bias, offset: scale * xp.exp((rate * v) + bias) + offset),
    "MatMul": (("A", "B"), lambda xp, a, b: xp.matmul(a, b)),
    "Relu": (("A",), lambda xp, a: a * (a > 0)),
}
for _trig in ("sin", "cos", "tan", "sinh", "cosh", "tanh", "arctan", "arcsin", "arccos"):
    _STANDARD[_trig] = ((_S0, "scale"), (lambda f: lambda xp, v, scale: scale * getattr(xp, f)(v))(_trig))

STANDARD_FUNCTIONS = frozenset(_STANDARD)

for _name, (_inputs, _fn) in _STANDARD.items():
    op(_name, _inputs, fresh=True)(_fn)
