"""Elementwise ops that fuse into one pass over memory, each written in one table: in place
on NumPy (a ufunc with ``out=``), as a C expression for a generated CUDA kernel
(:mod:`~gpu_mdf.engine.ops.cuda`) and, most of them, as a Python expression for a chain
compiled into one ufunc by numba on the CPU (:mod:`~gpu_mdf.engine.ops.cpu`).

A fused chain is a short program over a few operands (the chain's input, constants, other
tensors that broadcast to its shape); each instruction reads operands and the result of
the instruction just before it. A chain may end in a *tail*, a softmax or log-softmax over
the last axis (one row per thread on a GPU).

All forms compute the same thing, NaN included: the C and Python forms are written with
comparisons that let a NaN through where NumPy's ufuncs do (``x < 0 ? 0 : x`` for Relu,
not ``fmaxf``, which drops it). C functions are written with a ``{f}`` suffix placeholder
so one template serves float32 (``expf``) and float64 (``exp``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import remembered


@dataclass(frozen=True)
class Fusible:
    arity: int                        # 1: unary, 2: binary (the second operand any operand)
    numpy: Callable                   # (a, b | None, out, attrs) -> out, written in place
    cuda: str                         # C expression over {a}, {b}, attribute names; {f}: "f" for float
    attrs: tuple[str, ...] = ()       # float attributes the op keeps (LeakyRelu's alpha...)
    onnx: tuple = ()                  # how an export writes it: ONNX nodes, when not the op itself
    # the same in numba's Python (a compiled CPU chain): {a}, {b}, attribute names, T the float
    # type. Left out where NumPy's own SIMD loop is faster than numba's scalar libm call (exp,
    # tanh: 2-8x): a chain with such an op runs as NumPy's in-place ufuncs.
    py: str = ""
    # a Python form for float32 chains only, where ``py`` is left out: a function of the
    # compiled kernels that vectorises, accurate to float32 but not NumPy's bits (tanh32,
    # exp32, sigmoid32: cpu._chain_functions)
    py32: str = ""

    def py_form(self, dtype) -> str:
        """The Python form a compiled chain of ``dtype`` values writes ("" where none)."""
        return self.py or (self.py32 if dtype is not None and np.dtype(dtype) == np.float32 else "")


def _np_sigmoid(a, b, out, at):
    """1 / (1 + e) where a >= 0 and e / (1 + e) below, e = exp(-|a|): the op's own form
    (elementwise.sigmoid, the same bits), accurate in both tails (0.5 tanh(a/2) + 0.5, the
    form before, gave 0 for 1e-8), in place (``out`` may be ``a``)."""
    below = a < 0                                    # read before out, which may be a, is written
    np.abs(a, out=out)
    np.negative(out, out=out)
    np.exp(out, out=out)                             # e
    den = out + out.dtype.type(1)
    np.copyto(out, out.dtype.type(1), where=~below)  # the numerator: 1, or e below 0 (NaN: e)
    return np.divide(out, den, out=out)


def _np_leaky_relu(a, b, out, at):
    return np.copyto(out, np.where(a >= 0, a, a * out.dtype.type(at["alpha"]))) or out


def _np_clip(a, b, out, at):
    return np.clip(a, out.dtype.type(at["min"]), out.dtype.type(at["max"]), out=out)


FUSIBLE: dict[str, Fusible] = {
    "onnx::Relu": Fusible(1, lambda a, b, out, at: np.maximum(a, 0, out=out), "({a} < 0 ? (T)0 : {a})",
        py="(T(0) if {a} <= 0 else {a})"),
    # float32 chains: 1 / (1 + exp32(-a)), within 2.5 ulp everywhere (cpu._chain_functions)
    "onnx::Sigmoid": Fusible(1, _np_sigmoid,
                             "({a} >= (T)0 ? (T)1 / ((T)1 + exp{f}(-{a})) : exp{f}({a}) / ((T)1 + exp{f}({a})))",
                             py32="sigmoid32({a})"),
    # float32 chains: Eigen's and ONNX Runtime's rational tanh (cpu.tanh32, within 7 ulp)
    "onnx::Tanh": Fusible(1, lambda a, b, out, at: np.tanh(a, out=out), "tanh{f}({a})", py32="tanh32({a})"),
    "onnx::Exp": Fusible(1, lambda a, b, out, at: np.exp(a, out=out), "exp{f}({a})", py32="exp32({a})"),
    "onnx::Neg": Fusible(1, lambda a, b, out, at: np.negative(a, out=out), "(-{a})", py="(-{a})"),
    "onnx::Abs": Fusible(1, lambda a, b, out, at: np.abs(a, out=out), "fabs{f}({a})", py="abs({a})"),
    "onnx::Sqrt": Fusible(1, lambda a, b, out, at: np.sqrt(a, out=out), "sqrt{f}({a})", py="math.sqrt({a})"),
    "onnx::Reciprocal": Fusible(1, lambda a, b, out, at: np.reciprocal(a, out=out), "((T)1 / {a})",
        py="(T(1) / {a})"),
    "onnx::LeakyRelu": Fusible(1, _np_leaky_relu, "({a} >= 0 ? {a} : {a} * {alpha})", ("alpha",),
        py="({a} if {a} >= 0 else {a} * {alpha})"),
    # min(max(a, min), max), as np.clip and ONNX Runtime: max where min > max
    "onnx::Clip": Fusible(1, _np_clip, "(({a} < {min} ? {min} : {a}) > {max} ? {max} : ({a} < {min} ? {min} : {a}))",
        ("min", "max"), py="({max} if ({min} if {a} < {min} else {a}) > {max} else ({min} if {a} < {min} else {a}))"),
    "onnx::Add": Fusible(2, lambda a, b, out, at: np.add(a, b, out=out), "({a} + {b})", py="({a} + {b})"),
    "onnx::Sub": Fusible(2, lambda a, b, out, at: np.subtract(a, b, out=out), "({a} - {b})", py="({a} - {b})"),
    "onnx::Mul": Fusible(2, lambda a, b, out, at: np.multiply(a, b, out=out), "({a} * {b})", py="({a} * {b})"),
    "onnx::Div": Fusible(2, lambda a, b, out, at: np.divide(a, b, out=out), "({a} / {b})", py="({a} / {b})"),
    # Where(GreaterOrEqual(c, a), a, c) for a constant c that is not NaN (the Keras converter's
    # min(x, max_value)): fmin, which also gives c where a is NaN, as the Where does
    "gpu_mdf::CapAt": Fusible(2, lambda a, b, out, at: np.fmin(a, b, out=out), "fmin{f}({a}, {b})",
                              onnx=("GreaterOrEqual(b, a) -> c", "Where(c, a, b)"),
        py="({b} if (({a} != {a}) | ({b} < {a})) else {a})"),
}
TAILS = ("softmax", "logsoftmax")
# the float types a fused chain and the generated CUDA kernels are written for ("f" suffix
# or none); a chain of another type (float16) is left unfused, its ops run one by one
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Instr:
    """One op of a fused chain: ``op`` on ``a`` (and ``b``): operand indices (``int``) or
    the result of the instruction before (``"r<k-1>"``)."""
    op: str
    a: int | str
    b: int | str | None = None
    attrs: tuple = ()                 # (name, value) pairs


def check_program(program: tuple[Instr, ...]) -> None:
    """Every result reference is to the instruction just before (the chain shares one buffer)."""
    for k, ins in enumerate(program):
        for ref in (ins.a, ins.b):
            if isinstance(ref, str) and ref != f"r{k - 1}":
                raise ValueError(f"instruction {k} of a fused chain reads {ref}, not r{k - 1}")


def run_numpy(program: tuple[Instr, ...], operands: list, out=None, tail: Callable | None = None):
    """The chain with NumPy, every result in one buffer (``out``, or a new one); ``tail``
    (the softmax kernel, say) then runs in place on it."""
    prev = None
    for ins in program:
        f = FUSIBLE[ins.op]
        a = prev if isinstance(ins.a, str) else operands[ins.a]
        b = None if ins.b is None else prev if isinstance(ins.b, str) else operands[ins.b]
        shape = a.shape if b is None or b.shape == a.shape else broadcast_shape(a.shape, b.shape)
        if out is None or out.shape != shape:
            out = np.empty(shape, np.result_type(a, b) if b is not None else a.dtype)
        r = f.numpy(a, b, out, dict(ins.attrs))
        if r is not out:
            np.copyto(out, r)
        prev = out
    if not program:
        out = operands[0] if out is not None and out is operands[0] else operands[0].copy()
    if tail is not None:
        out = tail(np, out, -1, inplace=True)
    return out


_SHAPES: dict = {}


def broadcast_shape(sa: tuple, sb: tuple) -> tuple:
    """np.broadcast_shapes, remembered (it costs microseconds a call; a chain runs per batch)."""
    return remembered(_SHAPES, (sa, sb), lambda: np.broadcast_shapes(sa, sb))


def c_chain(program: tuple[Instr, ...], operand: Callable[[int], str], suffix: str) -> list[str]:
    """C statements ``T r0 = ...;`` computing the chain, operands written by ``operand(k)``."""
    lines = []
    for k, ins in enumerate(program):
        def ref(r):
            return r if isinstance(r, str) else operand(r)
        names = {"a": ref(ins.a), "b": ref(ins.b) if ins.b is not None else "", "f": suffix,
                 **{name: f"(T){float(v)!r}" for name, v in ins.attrs}}
        lines.append(f"T r{k} = {FUSIBLE[ins.op].cuda.format(**names)};")
    return lines


def compiles(program: tuple[Instr, ...], dtype=None) -> bool:
    """Whether the chain is worth compiling for the CPU: two ops or more (one op is one NumPy
    ufunc already), some of them with a Python form for ``dtype`` (:func:`segments`); or one
    op whose form is one of ``dtype``'s own (a float32 sigmoid: sigmoid32 is faster than
    NumPy's form, and keeps its relative accuracy where 0.5 tanh(x/2) + 0.5 rounds to 0)."""
    if len(program) == 1 and FUSIBLE[program[0].op].py32 and FUSIBLE[program[0].op].py_form(dtype):
        return True
    return len(program) >= 2 and any(seg.program for seg in segments(program, dtype))


PREV = "prev"


@dataclass(frozen=True)
class Segment:
    """A piece of a chain on the CPU: a compiled sub-chain (``program`` over ``operands``:
    PREV, the value so far; an int, the chain's operand; a float, a constant), or one op
    without a Python form (``op``: exp, tanh, sigmoid) run by NumPy in place on the value so far
    (or on the chain's operand ``operands[0]`` when it comes first)."""
    program: tuple[Instr, ...] = ()
    operands: tuple = ()                # PREV, int (an operand of the chain) or float (a constant)
    op: str = ""
    attrs: tuple = ()


def segments(program: tuple[Instr, ...], dtype=None) -> list[Segment]:
    """The chain cut at its ops without a Python form for ``dtype`` (None: the forms of
    every type): each of those runs as its NumPy form on the value so far."""
    steps = []                          # (op, a, b, attrs); references PREV, an int, or ("const", value)
    for ins in program:
        a, b = (PREV if isinstance(r, str) else r for r in (ins.a, ins.b))
        steps.append((ins.op, a, b, ins.attrs))
    out, run = [], []
    for step in steps + [None]:
        if step is not None and FUSIBLE[step[0]].py_form(dtype):
            run.append(step)
            continue
        if run:
            out.append(_sub_chain(run, first=not out))
            run = []
        if step is not None:
            out.append(Segment(operands=(step[1],), op=step[0], attrs=step[3]))
    return out


def _sub_chain(steps: list, first: bool) -> Segment:
    """Compiled steps as a chain of their own: operand 0 the chain's operand 0 (first) or the
    value so far (later), then the other operands and constants it reads."""
    operands = [0 if first else PREV]

    def ref(r, k):
        if r is None:
            return None
        if r == PREV and k:
            return f"r{k - 1}"
        if isinstance(r, tuple) or r not in operands:
            operands.append(r[1] if isinstance(r, tuple) else r)
            return len(operands) - 1
        return operands.index(r)
    instrs = tuple(Instr(op, ref(a, k), ref(b, k), attrs) for k, (op, a, b, attrs) in enumerate(steps))
    return Segment(program=instrs, operands=tuple(operands))


def py_chain(program: tuple[Instr, ...], dtype=None) -> tuple[str, dict]:
    """The chain as the source of a Python function ``chain(x0, x1, ...)`` of scalars (for
    numba to compile into a ufunc), and the constants it reads (:func:`_py_statements`);
    ``T`` is the float type, ``math`` the module."""
    body, consts = _py_statements(program, lambda k: f"x{k}", "    ", dtype)
    lines = [f"def chain({', '.join(f'x{k}' for k in range(n_operands(program)))}):", *body,
             f"    return r{len(program) - 1}"]
    return "\n".join(lines) + "\n", consts


def py_rows(program: tuple[Instr, ...], full: frozenset = frozenset(), dtype=None) -> tuple[str, dict]:
    """The chain as ``rows(x0, x1, ..., out)`` and the constants it reads: ``x0``, ``out``
    and the operands numbered in ``full`` (n, w), every other operand a row of w values;
    plain loops over contiguous rows, which numba's compiler turns into SIMD code (a
    ufunc's loop, written for any strides, is not). Each row is computed into a buffer of
    its own, then copied: ``out`` may be ``x0``, and a loop that writes where it reads is
    not vectorised (10x slower for a clip)."""
    n = n_operands(program)
    body, consts = _py_statements(program, lambda k: f"x{k}[i, j]" if k == 0 or k in full else f"x{k}[j]",
                                  " " * 12, dtype)
    lines = [f"def rows({', '.join(f'x{k}' for k in range(n))}, out):",
             "    row = np.empty(x0.shape[1], out.dtype)",
             "    for i in range(x0.shape[0]):",
             "        for j in range(x0.shape[1]):", *body,
             f"            row[j] = r{len(program) - 1}",
             "        for j in range(x0.shape[1]):",
             "            out[i, j] = row[j]"]
    return "\n".join(lines) + "\n", consts


def _py_statements(program: tuple[Instr, ...], operand: Callable[[int], str], indent: str,
                   dtype=None) -> tuple[list, dict]:
    """One statement an instruction. The text is built from the fusion table's templates,
    operand numbers and names made here, nothing else: an attribute's value is a constant
    of the namespace (``c<k>_<name>``), never text, and a reference that is not an operand
    number or the previous result is refused. The source is exec'd (cpu._compile_chain)."""
    check_program(program)                      # a text reference is the previous result's name
    lines, consts = [], {}
    for k, ins in enumerate(program):
        f = FUSIBLE[ins.op]
        form = f.py_form(dtype)
        if not form:
            raise ValueError(f"{ins.op} has no Python form" + (f" for {np.dtype(dtype)}" if dtype else ""))
        if any(type(r) not in (int, str) for r in (ins.a, ins.b) if r is not None):
            raise ValueError(f"instruction {k} of a fused chain reads {ins.a!r}, {ins.b!r}")
        given = dict(ins.attrs)
        names = {"a": ins.a if isinstance(ins.a, str) else operand(ins.a),
                 "b": "" if ins.b is None else ins.b if isinstance(ins.b, str) else operand(ins.b)}
        for name in f.attrs:
            consts[f"c{k}_{name}"] = float(given[name])
            names[name] = f"T(c{k}_{name})"             # in the chain's type, as NumPy's form has it
        lines.append(f"{indent}r{k} = T({form.format(**names)})")
    return lines, consts


def n_operands(program: tuple[Instr, ...]) -> int:
    return 1 + max((i for ins in program for i in (ins.a, ins.b) if isinstance(i, int)), default=0)


def fusible(spec_name: str, attrs: dict) -> bool:
    """Whether an op (with these attributes) joins a fused chain."""
    f = FUSIBLE.get(spec_name)
    if f is None:
        return False
    values = [attrs.get(a) for a in f.attrs]
    # a bound C cannot spell as a literal (inf, nan), or a missing one: the op runs alone
    return all(v is not None and np.isfinite(v) for v in values)


__all__ = ["FUSIBLE", "TAILS", "Fusible", "Instr", "c_chain", "check_program", "fusible", "n_operands",
           "PREV", "Segment", "compiles", "py_chain", "py_rows", "broadcast_shape", "run_numpy", "segments"]
