"""Safe MDF expressions: parsed with :mod:`ast` against a whitelist, never ``eval``.

An expression such as ``"(x @ W) + b"`` or ``"A * (A > 0)"`` compiles once into a
tree of closures; each call evaluates it against an environment of arrays.
Allowed: numbers, names in scope, arithmetic (``+ - * / // % ** @``), comparisons,
unary ``- + not``, list/tuple literals, subscripts with constant indices, and calls
to the fixed function table below (also spelled ``math.f``/``numpy.f``, as
modeci_mdf's expressions may be). Everything else (other attribute access,
strings, lambdas, comprehensions, keyword arguments, arithmetic on list literals
such as ``[0] * 10**9``...) is refused at compile time with the offending text.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CompileError

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: lambda a, b: np.float64(a) ** b if isinstance(a, int) else a ** b,  # no huge ints
    ast.MatMult: operator.matmul,
}
_CMPOPS = {
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "inf": math.inf}


def weak(a, b):
    """``(a, b)`` with a Python number beside a float array or NumPy float taken in that
    float's type: NumPy 2's rule for Python scalars (NEP 50), kept on NumPy 1.x too, where
    a 0-d float32 times a Python float was float64 (a folded constant, a scalar graph)."""
    if type(a) in (int, float) and getattr(getattr(b, "dtype", None), "kind", None) == "f":
        return b.dtype.type(a), b
    if type(b) in (int, float) and getattr(getattr(a, "dtype", None), "kind", None) == "f":
        return a, a.dtype.type(b)
    return a, b


def _weakly(op):
    def f(a, b):
        return op(*weak(a, b))
    return f
_MODULES = ("math", "numpy", "np")
MAX_EXPRESSION_CHARS = 10_000


def erf(xp, x):
    """Error function on any array module (CuPy has it in cupyx; NumPy has none)."""
    if getattr(xp, "__name__", "") == "cupy":
        import cupyx.scipy.special as sp
        return sp.erf(x)
    try:
        from scipy.special import erf as _erf
        return _erf(x).astype(x.dtype, copy=False) if hasattr(x, "dtype") else _erf(x)
    except ImportError:  # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7)
        s = xp.sign(x)
        a = xp.abs(x)
        t = 1.0 / (1.0 + 0.3275911 * a)
        y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
                   + 0.254829592) * t * xp.exp(-a * a)
        return s * y


def _table(xp) -> dict[str, Callable]:
    """Math/NumPy-style functions an expression may call, bound to ``xp``."""
    names = ["exp", "log", "sqrt", "sin", "cos", "tan", "arcsin", "arccos", "arctan",
             "sinh", "cosh", "tanh", "abs", "maximum", "minimum", "where", "sign",
             "floor", "ceil", "square", "log1p", "expm1", "clip", "log10", "log2", "round", "arctan2"]
    t = {n: getattr(xp, n) for n in names}
    t.update(asin=xp.arcsin, acos=xp.arccos, atan=xp.arctan, atan2=xp.arctan2, fabs=xp.abs, pow=xp.power,
             erf=lambda x: erf(xp, x), max=xp.maximum, min=xp.minimum)
    return t


FUNCTION_NAMES = frozenset(_table(np))


@dataclass
class Expr:
    """A compiled expression: ``fn(env)`` evaluates it, ``deps`` names what it reads."""

    text: str
    fn: Callable[[dict], Any]
    deps: frozenset[str]

    @property
    def constant(self) -> bool:
        return not self.deps


def _refuse(text: str, node: ast.AST, why: str):
    frag = ast.get_source_segment(text, node) or type(node).__name__
    raise CompileError(f"refused MDF expression {text!r}: {why} ({frag!r})")


def compile_expr(text: str, scope, xp, getters: Mapping[str, Callable[[dict], Any]] | None = None,
                 multi: frozenset[str] | set[str] = frozenset()) -> Expr:
    """Compile ``text`` where ``scope`` lists the names that may be read.

    ``getters`` maps a name to a function of the environment giving its value
    (default: ``env[name]``). Names in ``multi`` hold the tuple of a multi-output op:
    a plain reference means its first output and ``name[i]`` its output ``i``.
    """
    if not isinstance(text, str):
        raise CompileError(f"expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CompileError(f"refused MDF expression of {len(text)} characters (limit {MAX_EXPRESSION_CHARS})")
    src = text.strip()
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as e:
        raise CompileError(f"refused MDF expression {text!r}: not valid syntax ({e.msg})") from None
    builder = _Builder(src, scope, xp, getters or {}, multi)
    fn = builder.build(tree.body)
    return Expr(src, fn, frozenset(builder.deps))


class _Builder:
    """Turns a whitelisted expression tree into a tree of closures ``env -> value``."""

    def __init__(self, src: str, scope, xp, getters, multi):
        self.src, self.scope, self.getters, self.multi = src, scope, getters, multi
        self.funcs = _table(xp)
        self.xp = xp
        self.deps: set[str] = set()

    def read(self, name: str, output: int | None):
        self.deps.add(name)
        g = self.getters.get(name) or (lambda env: env[name])
        if name in self.multi:
            i = output or 0
            return lambda env: g(env)[i]
        return g

    def func_name(self, f: ast.AST) -> str | None:
        if isinstance(f, ast.Name) and f.id not in self.scope:
            return f.id
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in _MODULES \
                and f.value.id not in self.scope:
            return f.attr
        return None

    def operand(self, n: ast.AST):
        if isinstance(n, (ast.List, ast.Tuple)):
            _refuse(self.src, n, "arithmetic on a list literal is not allowed")
        return self.build(n)

    def build(self, n: ast.AST) -> Callable[[dict], Any]:
        method = getattr(self, "_" + type(n).__name__.lower(), None)
        if method is None:
            _refuse(self.src, n, f"{type(n).__name__} is not allowed")
        return method(n)

    def _constant(self, n: ast.Constant):
        if type(n.value) not in (int, float, bool):
            _refuse(self.src, n, "only numeric constants are allowed")
        v = n.value
        return lambda env: v

    def _name(self, n: ast.Name):
        if n.id in self.scope:
            return self.read(n.id, None)
        if n.id in _CONSTANTS:
            v = _CONSTANTS[n.id]
            return lambda env: v
        _refuse(self.src, n, "unknown name")

    def _attribute(self, n: ast.Attribute):
        if isinstance(n.value, ast.Name) and n.value.id in _MODULES and n.attr in _CONSTANTS \
                and n.value.id not in self.scope:
            v = _CONSTANTS[n.attr]
            return lambda env: v
        _refuse(self.src, n, "attribute access is not allowed")

    def _binop(self, n: ast.BinOp):
        if type(n.op) not in _BINOPS:
            _refuse(self.src, n, f"{type(n).__name__} is not allowed")
        op, lhs, rhs = _weakly(_BINOPS[type(n.op)]), self.operand(n.left), self.operand(n.right)
        return lambda env: op(lhs(env), rhs(env))

    def _unaryop(self, n: ast.UnaryOp):
        inner = self.operand(n.operand)
        if isinstance(n.op, ast.USub):
            return lambda env: -inner(env)
        if isinstance(n.op, ast.UAdd):
            return inner
        if isinstance(n.op, ast.Not):
            logical_not = self.xp.logical_not
            return lambda env: logical_not(inner(env))
        _refuse(self.src, n, "operator not allowed")

    def _compare(self, n: ast.Compare):
        if len(n.ops) != 1 or type(n.ops[0]) not in _CMPOPS:
            _refuse(self.src, n, "only single comparisons are allowed")
        op, lhs, rhs = _weakly(_CMPOPS[type(n.ops[0])]), self.operand(n.left), self.operand(n.comparators[0])
        return lambda env: op(lhs(env), rhs(env))

    def _call(self, n: ast.Call):
        name = self.func_name(n.func)
        if name is None or name not in self.funcs:
            _refuse(self.src, n, f"only calls to {sorted(self.funcs)} are allowed")
        if n.keywords:
            _refuse(self.src, n, "keyword arguments are not allowed")
        f = self.funcs[name]
        args = [self.build(a) for a in n.args]
        return lambda env: f(*(a(env) for a in args))

    def _sequence(self, n: ast.List | ast.Tuple):
        elements = [self.build(e) for e in n.elts]
        return lambda env: [e(env) for e in elements]

    _list = _tuple = _sequence

    def _subscript(self, n: ast.Subscript):
        index = _const_index(self.src, n.slice)
        if isinstance(n.value, ast.Name) and n.value.id in self.multi and isinstance(index, int):
            return self.read(n.value.id, index)       # output `index` of a multi-output op
        base = self.build(n.value)
        return lambda env: base(env)[index]


def _const_index(src: str, n: ast.AST):
    """A subscript index made of integer constants and slices only."""
    if isinstance(n, ast.Constant) and type(n.value) is int:
        return n.value
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub) and isinstance(n.operand, ast.Constant) \
            and type(n.operand.value) is int:
        return -n.operand.value
    if isinstance(n, ast.Slice):
        parts = [None if p is None else _const_index(src, p) for p in (n.lower, n.upper, n.step)]
        return slice(*parts)
    if isinstance(n, ast.Tuple):
        return tuple(_const_index(src, e) for e in n.elts)
    _refuse(src, n, "subscripts must be integer constants or slices")
