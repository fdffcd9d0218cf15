"""The plan's vocabulary: values, references to them, and the steps a batch runs.

Every value has a *place*:

* ``const``: known at compile time (parameters, bound weights, anything computed only
  from them). Folded on the host with NumPy; moved to the device once when bound.
* ``host``: computed per batch on the host from array *shapes* (``Shape`` and the
  arithmetic on its result): small integer arrays that never visit the device.
* ``device``: the per-batch tensors.

A step is one computation per batch. Each kind is a small class that knows how to
become a closure over arrays (:meth:`Step.bind`, given a binder that resolves its
arguments) and how to become ONNX nodes (:meth:`Step.export`, given the exporter of
:mod:`gpu_mdf.engine.onnx_export`). The plan knows nothing of CuPy; the binder nothing
of MDF.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .expr import compile_expr, weak
from .ops import OpError, OpSpec, cpu, nn
from .ops.fusion import Instr, broadcast_shape, check_program, compiles, run_numpy, segments
from .ops.nn import log_softmax, softmax

CONST, HOST, DEVICE = "const", "host", "device"


@dataclass(eq=False)
class Val:
    """A value of the plan. ``multi``: the value is the tuple of a multi-output op."""

    key: Any
    place: str
    const: Any = None
    multi: int = 0
    what: str = ""           # where it comes from, for messages
    basis: int = 0           # a constant: the elements of file or caller data it was computed from


@dataclass(frozen=True)
class Ref:
    """A use of a value; ``index`` selects one output of a multi-output value."""

    val: Val
    index: int | None = None

    @property
    def place(self) -> str:
        return self.val.place

    def host_value(self):
        v = self.val.const
        if self.val.multi:
            return v[self.index or 0]
        return v


@dataclass
class Step:
    """One computation per batch, producing the value ``key`` from ``args``."""

    key: Any
    place: str                      # HOST or DEVICE
    args: list[Ref]
    what: str

    # what the in-place planner may do with the result (see plan.plan_inplace)
    owns_result = False             # the result is always new memory of the program

    def bind(self, b, xp):
        """A function ``env -> value`` computing this step on ``xp``."""
        raise NotImplementedError

    def export(self, e) -> None:
        """Append this step's ONNX nodes to the exporter ``e`` and name its result there."""
        raise NotImplementedError


@dataclass
class OpStep(Step):
    """A kernel of the op table."""

    spec: OpSpec = None
    attrs: dict = field(default_factory=dict)
    n_outputs: int = 0              # multi-output ops: how many outputs are read
    static: tuple[bool, ...] = ()   # which args the kernel takes as host values
    inplace: bool = False           # set by the planner: may overwrite its first argument
    tuning: dict = field(default_factory=dict)   # a pass's choice of algorithm (kernel keywords, never exported)
    epilogue: tuple = ()            # activations a pass moved into the kernel: (op, constants...) each

    def bind(self, b, xp):
        kw = {**self.attrs, **self.tuning}
        if self.epilogue:
            kw["epilogue"] = self.epilogue
        if self.inplace:
            kw["inplace"] = True
        static = tuple(self.static) + (False,) * (len(self.args) - len(self.static))
        gets = [b.getter(r, "host" if s else "device", xp) for r, s in zip(self.args, static)]
        kernel = self.spec.kernel
        if len(gets) == 1:
            g0 = gets[0]
            return lambda env: kernel(xp, g0(env), **kw)
        return lambda env: kernel(xp, *[g(env) for g in gets], **kw)

    def export(self, e) -> None:
        e.op_step(self)
        for op, *consts in self.epilogue:               # as a FusedStep writes each
            at = {"min": consts[0], "max": consts[1]} if op == "onnx::Clip" else {}
            b = e.const(np.asarray(consts[0])) if op == "gpu_mdf::CapAt" else None
            e.names[self.key] = _export_fused_op(e, op, e.names[self.key], b, at)


@dataclass
class ExpandDepthwiseStep(Step):
    """A 1x1 conv with its bias and activations (an inverted residual's expansion) and the
    depthwise conv that alone reads its value, and the 1x1 projection (a bias or none, no
    activation) that alone reads the depthwise conv's where there is one, one image at a
    time (the :func:`~gpu_mdf.engine.passes.expand_depthwise` pass, on the CPU): the
    expanded and the depthwise conv's images stay in cache and are never written to memory
    whole. Without ``expand``, a depthwise conv and its projection. With ``residual``, the
    chain after the projection, (its bias) and the Add of the block's input, runs in the
    kernel too. ``args``: the expansion's (input, weights, bias) or the depthwise conv's
    input, the depthwise conv's (weights, bias), then the projection's weights (and bias:
    its own or the residual chain's)."""

    expand: OpStep | None = None    # None: a depthwise conv with no expansion before it
    depthwise: OpStep = None
    project: OpStep | None = None
    residual: FusedStep | None = None   # the projection's bias (or none) and the Add of the input after it
    owns_result = True              # new memory, as the convs' was

    @property
    def parts(self) -> int:
        """The steps it runs (Program.block_size counts them): its convolutions, and the
        residual chain."""
        return sum(st is not None for st in (self.expand, self.depthwise, self.project, self.residual))

    def bind(self, b, xp):
        """The convs' weights are constants (the pass takes no other): bound once
        (:func:`~gpu_mdf.engine.ops.nn.expand_depthwise_fn`), the input read per batch."""
        ex, dw, pr = self.expand, self.depthwise, self.project
        weights = (ex.args[1:] if ex is not None else [None, None]) + dw.args[1:]
        first = len(dw.args) + (len(ex.args) - 1 if ex is not None else 0)      # the projection's weights
        project = self.args[first:] + [None] * 2 if pr is not None else [None, None]
        if any(r is not None and r.place != CONST for r in weights + project):
            raise ValueError(f"{self.what}: its weights are not constants")
        we, be, wd, bd, wp, bp = [b.getter(r, "device", xp)({}) for r in weights + project[:2]]
        fn = nn.expand_depthwise_fn(xp, we, be, wd, bd, ex.epilogue if ex is not None else (), dw.epilogue,
                                    ex.attrs if ex is not None else {}, **dw.attrs, wp=wp, bp=bp,
                                    project_attrs=dict(pr.attrs) if pr is not None else None,
                                    residual=self.residual is not None)
        gx = b.getter(self.args[0], "device", xp)
        return lambda env: fn(gx(env))

    def export(self, e) -> None:
        for st in (self.expand, self.depthwise, self.project, self.residual):    # the steps, as they were
            if st is not None:
                st.export(e)
        e.names[self.key] = e.names[(self.residual or self.project or self.depthwise).key]


@dataclass
class ExprStep(Step):
    """An MDF expression (a whitelisted arithmetic text) over named arguments."""

    text: str = ""
    names: tuple[str, ...] = ()     # the name each arg has in the text
    multi: frozenset = frozenset()  # names holding a multi-output tuple

    def bind(self, b, xp):
        getters = {n: b.getter(r, "whole" if n in self.multi else "expr", xp) for n, r in zip(self.names, self.args)}
        return compile_expr(self.text, frozenset(self.names), xp, getters=getters, multi=self.multi).fn

    def export(self, e) -> None:
        raise ValueError(f"{self.what}: an MDF expression ({self.text!r}) has no ONNX form")


@dataclass
class EdgeStep(Step):
    """Several weighted edges into one port, summed (or multiplied)."""

    weights: list = field(default_factory=list)   # per source: None, a float or an array
    reduce: str = "add"
    owns_result = True

    def bind(self, b, xp):
        gets = [b.getter(r, "device", xp) for r in self.args]
        ws = [None if w is None else (w if isinstance(w, float) else b.dev(w)) for w in self.weights]
        mult = self.reduce == "multiply"

        def edge(env):
            v = None
            for g, w in zip(gets, ws):
                s = g(env) if w is None else operator.mul(*weak(g(env), w))
                v = s if v is None else (v * s if mult else v + s)
            return v
        return edge

    def export(self, e) -> None:
        acc = None
        for r, w in zip(self.args, self.weights):
            v = e.ref(r)
            if w is not None:
                v = e.node("Mul", [v, e.const(np.asarray(w, e.dtype))])
            if acc is not None:
                v = e.node("Mul" if self.reduce == "multiply" else "Add", [acc, v])
            acc = v
        e.names[self.key] = acc


@dataclass
class MoveStep(Step):
    """A per-batch host value needed on the device: one small copy per batch."""

    owns_result = True

    def bind(self, b, xp):
        g = b.getter(self.args[0], "host", np)
        return lambda env: xp.asarray(g(env))

    def export(self, e) -> None:
        e.names[self.key] = e.node("Identity", [e.ref(self.args[0])])


def _compiled_chain(program, dtype, gets, inplace, tail_kernel):
    """A fused chain on the CPU, compiled (:func:`~gpu_mdf.engine.ops.cpu.fused`); operands of
    another type than the chain's (none where the planner typed it) go through NumPy's
    forms, which cast as the ops one by one would.

    A float32 chain whose tanh (or sigmoid) runs compiled (``cpu.tanh32``) does so only
    where its first operand has the result's shape: where another operand broadcasts it
    larger (a squeeze-excite gate, sigmoid(s) * x with s one value a channel), the chain is
    cut around NumPy's form of the op, which then runs on the small value once, not per element."""
    cuts = [segments(program, dtype), segments(program)]
    cuts = cuts[:1] if cuts[0] == cuts[1] else cuts
    chains = [[cpu.fused(seg.program, dtype) if seg.program else None for seg in segs] for segs in cuts]

    def run(env):
        ops = [g(env) for g in gets]
        if any(getattr(o, "dtype", None) != dtype for o in ops):
            return run_numpy(program, ops, out=ops[0] if inplace else None, tail=tail_kernel)
        k = 0
        if len(cuts) > 1:
            shape = ops[0].shape
            for o in ops[1:]:
                shape = broadcast_shape(shape, o.shape)
            k = shape != ops[0].shape
        out = cpu.run_segments(cuts[k], chains[k], ops, inplace, dtype)
        if not isinstance(out, np.ndarray):          # a ufunc of 0-d operands returns a scalar
            out = np.asarray(out)
        return out if tail_kernel is None else tail_kernel(np, out, -1, inplace=True)
    return run


def _export_fused_op(e, op: str, a: str, b: str | None, at: dict) -> str:
    """One op of a fused chain (or an epilogue) as ONNX nodes on ``a`` (and ``b``)."""
    if op == "gpu_mdf::CapAt":                          # Where(GreaterOrEqual(b, a), a, b)
        return e.node("Where", [e.node("GreaterOrEqual", [b, a]), a, b])
    if op == "onnx::Clip":                              # bounds are inputs since opset 11
        return e.node("Clip", [a, e.const(np.asarray(at["min"])), e.const(np.asarray(at["max"]))])
    return e.node(op.split("::")[1], [a] + ([b] if b is not None else []), **at)


@dataclass
class FusedStep(Step):
    """A chain of elementwise ops (the ``fuse_elementwise`` pass), possibly ending in a
    softmax or log-softmax over the last axis, in one pass over memory: NumPy ufuncs in
    place into one buffer, or one generated CUDA kernel (:mod:`~gpu_mdf.engine.ops.cuda`)."""

    program: tuple[Instr, ...] = ()
    dtype: Any = None                # the chain's float type (the kernel's T)
    inplace: bool = False            # may write into args[0] (set by the in-place planner)
    tail: str | None = None          # "softmax" | "logsoftmax" over the last axis
    kinds: tuple = ()                # with a tail: how each operand is read per row (cuda.ROW_INDEX)

    def __post_init__(self):
        check_program(self.program)

    def bind(self, b, xp):
        gets = [b.getter(r, "device", xp) for r in self.args]
        program, inplace, tail = self.program, self.inplace, self.tail
        if xp is np:
            tail_kernel = {"softmax": softmax, "logsoftmax": log_softmax, None: None}[tail]
            if compiles(program, self.dtype) and cpu.takes(self.dtype):
                return _compiled_chain(program, np.dtype(self.dtype), gets, inplace, tail_kernel)
            return lambda env: run_numpy(program, [g(env) for g in gets],
                                         out=gets[0](env) if inplace else None, tail=tail_kernel)
        from .ops import cuda
        if tail is None:
            kernel = cuda.fused(xp, program, self.dtype)
            if not inplace:
                return lambda env: kernel(*[g(env) for g in gets])

            def run_in_place(env):
                ops = [g(env) for g in gets]
                if ops[0].shape == np.broadcast_shapes(*(o.shape for o in ops)):
                    return kernel(*ops, ops[0])        # written over its first operand
                return kernel(*ops)
            return run_in_place
        kinds, what = self.kinds, self.what

        def run_rows(env):
            ops = [g(env) for g in gets]
            full = [o.shape for o, k in zip(ops, kinds) if k == "full"]
            if any(s != full[0] for s in full):
                raise OpError(f"{what}: operands of shapes {full} in one row kernel")
            out = ops[0] if inplace else xp.empty(full[0], dtype=self.dtype)
            return cuda.row_softmax(xp, program, kinds, tail, ops, out)
        return run_rows

    def export(self, e) -> None:
        prev = None
        for ins in self.program:
            a, b = (prev if isinstance(o, str) else e.ref(self.args[o]) if o is not None else None
                    for o in (ins.a, ins.b))
            prev = _export_fused_op(e, ins.op, a, b, dict(ins.attrs))
        if not self.program:
            prev = e.ref(self.args[0])
        if self.tail:
            prev = e.node("Softmax" if self.tail == "softmax" else "LogSoftmax", [prev], axis=-1)
        e.names[self.key] = prev


__all__ = ["CONST", "HOST", "DEVICE", "Val", "Ref", "Step", "OpStep", "ExprStep", "EdgeStep", "MoveStep", "FusedStep"]
