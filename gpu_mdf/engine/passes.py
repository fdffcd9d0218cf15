"""Optimising passes, run on a plan between planning and binding (``compile(optimize=False)``
skips them; ``Program.describe()`` lists what each did).

Each pass is a function ``pass(plan, info) -> str | None`` that rewrites ``plan.steps`` in
place and says what it changed; ``info`` maps a step's key to the (shape, dtype) its value
had on the compile-time probe run (batch 1), or is None where the probe could not run.
The numbers stay the same up to float rounding (the tests hold every converter and interop
case to 1e-5 x max|y| against ``optimize=False``):

* :func:`fold_batchnorm`: a BatchNormalization (inference) right after a Conv, a
  ConvTranspose or a Gemm with constant weights is folded into those weights and bias;
* :func:`fold_channel_affine`: a Mul/Add/Sub/Div by a per-channel constant after such an op
  (also across Transposes: the Keras converter's BatchNormalization algebra) is folded the same way;
* :func:`fuse_elementwise`: a chain of elementwise ops whose intermediate values nothing
  else reads becomes one step: one pass over memory on NumPy, one generated kernel on CuPy;
* :func:`max_pool_first`: a max pooling after such a chain, when the chain is non-decreasing
  (bias, ReLU, a positive scale), runs first: the chain then runs on the pooled values;
* :func:`depthwise_epilogue` (a program on the CPU only): a depthwise convolution's bias
  and ReLU/ReLU6 after it run inside its compiled kernel; :func:`pointwise_epilogue`: a 1x1
  convolution's, on each block of its output rows while the block is in cache;
* :func:`winograd_convs` (a program on the CPU only): a 3x3 convolution with many channels
  runs as Winograd's F(2x2, 3x3), 16 products a 2x2 block of outputs where im2col makes 36;
* :func:`move_transposes` and :func:`cancel_transposes` (last): a Transpose before an
  elementwise chain moves after it; Transposes of Transposes composed (none where they
  undo each other), Reshapes of Reshapes read the first one's input;
* :func:`expand_depthwise` (a program on the CPU only, after those): a 1x1 convolution
  with its activations and the depthwise convolution reading it run one image at a time.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .ops.fusion import FUSIBLE, KERNEL_DTYPES, Instr, fusible
from .steps import CONST, DEVICE, ExpandDepthwiseStep, FusedStep, OpStep, Ref, Val


# --------------------------------------------------------------------------- #
# Plan surgery
# --------------------------------------------------------------------------- #
class _Index:
    """Who reads what in a plan: how often each value key is read (graph outputs count), the
    steps reading it, the step producing it. Built once and kept until the plan changes
    (every rewrite below calls :func:`_changed`): asking for each step anew made the passes
    quadratic (30 s on Swin's 3,500 steps)."""

    def __init__(self, plan):
        self.n_steps = len(plan.steps)
        self.uses: Counter = Counter()
        self.readers: dict = {}
        self.producer = {st.key: st for st in plan.steps}
        for st in plan.steps:
            seen = set()
            for r in st.args:
                if r is None:
                    continue
                self.uses[r.val.key] += 1
                if r.val.key not in seen:
                    seen.add(r.val.key)
                    self.readers.setdefault(r.val.key, []).append(st)
        for o in plan.outputs:
            self.uses[o.ref.val.key] += 1


def _index(plan) -> _Index:
    idx = getattr(plan, "_pass_index", None)
    if idx is None or idx.n_steps != len(plan.steps):
        idx = plan._pass_index = _Index(plan)
    return idx


def _changed(plan) -> None:
    plan._pass_index = None


def _uses(plan) -> Counter:
    return _index(plan).uses


def _readers(plan, key) -> list:
    return _index(plan).readers.get(key, [])


def _producer(plan, key):
    return _index(plan).producer.get(key)


def _redirect(plan, old: Val, new: Ref) -> None:
    """Every use of ``old`` now reads ``new``."""
    for st in plan.steps:
        st.args = [new if r is not None and r.val is old else r for r in st.args]
    for o in plan.outputs:
        if o.ref.val is old:
            o.ref = new
    _changed(plan)


def _val_of(plan, key) -> Val | None:
    """The value ``key`` as its readers (or the graph's outputs) refer to it; None if none does."""
    for st in _readers(plan, key):
        for r in st.args:
            if r is not None and r.val.key == key:
                return r.val
    return next((o.ref.val for o in plan.outputs if o.ref.val.key == key), None)


def _const(value: np.ndarray, basis: int, what: str) -> Ref:
    return Ref(Val(("folded", what, id(value)), CONST, value, what=what, basis=basis))


def _is_const(r) -> bool:
    return r is not None and r.place == CONST and r.index is None and isinstance(r.host_value(), np.ndarray)


# --------------------------------------------------------------------------- #
# Folding into weights
# --------------------------------------------------------------------------- #
_FOLD_INTO = ("onnx::Conv", "onnx::ConvTranspose", "onnx::Gemm")


def _producer_val(plan, st) -> tuple[OpStep, Ref] | None:
    """The weight-carrying step whose value ``st`` reads first, when that is its only reader."""
    x = st.args[0] if st.args else None
    if x is None or x.place != DEVICE or x.index is not None:
        return None
    prod = _producer(plan, x.val.key)
    if not isinstance(prod, OpStep) or prod.spec.name not in _FOLD_INTO or not _foldable(prod):
        return None
    return prod, x


def _foldable(p: OpStep) -> bool:
    """Constant weights (and bias), and a channel layout the folding understands."""
    if not _is_const(p.args[1]) or (len(p.args) > 2 and p.args[2] is not None and not _is_const(p.args[2])):
        return False
    if p.spec.name == "onnx::ConvTranspose":
        return p.attrs.get("group", 1) == 1
    if p.spec.name == "onnx::Gemm":
        c = p.args[2].host_value() if len(p.args) > 2 and p.args[2] is not None else None
        return not p.attrs.get("transA") and (c is None or c.ndim <= 1 or c.shape[0] == 1)
    return True


def _scale_out_channels(p: OpStep, scale: np.ndarray, shift: np.ndarray, basis: int) -> None:
    """Weights and bias of ``p`` such that its result is ``result * scale + shift`` per
    output channel (axis 1 of its result)."""
    w = p.args[1].host_value()
    name = p.spec.name
    if name == "onnx::Conv":
        shape = (-1,) + (1,) * (w.ndim - 1)
    elif name == "onnx::ConvTranspose":
        shape = (1, -1) + (1,) * (w.ndim - 2)
    else:                                   # Gemm: B is (K, F), or (F, K) with transB
        shape = (-1, 1) if p.attrs.get("transB") else (1, -1)
    has_bias = len(p.args) > 2 and p.args[2] is not None
    bias = p.args[2].host_value().astype(np.float64).reshape(-1) if has_bias else 0.0
    if name == "onnx::Gemm":
        bias = bias * p.attrs.get("beta", 1.0)
        p.attrs = {**p.attrs, "beta": 1.0}
    new_w = (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype)
    new_b = (np.broadcast_to(bias, scale.shape) * scale + shift).astype(w.dtype)
    args = list(p.args) + [None] * (3 - len(p.args))
    args[1] = _const(new_w, basis, f"{p.what}: weights folded")
    args[2] = _const(new_b, basis, f"{p.what}: bias folded")
    p.args = args
    # (the index is unchanged: constants in, constants out)


def _remove(plan, st, replacement: Ref) -> None:
    """Drop step ``st``; its readers read ``replacement`` instead."""
    plan.steps.remove(st)
    _redirect(plan, _value_of(plan, st, replacement), replacement)


def _value_of(plan, st, fallback: Ref) -> Val:
    """The Val object of a step's result (found through its readers or the outputs)."""
    for other in plan.steps:
        for r in other.args:
            if r is not None and r.val.key == st.key:
                return r.val
    for o in plan.outputs:
        if o.ref.val.key == st.key:
            return o.ref.val
    return fallback.val


def fold_batchnorm(plan, info=None) -> str | None:
    """BatchNormalization right after a Conv/ConvTranspose/Gemm: into its weights and bias."""
    uses, folded = _uses(plan), 0
    for st in list(plan.steps):
        if not (isinstance(st, OpStep) and st.spec.name == "onnx::BatchNormalization" and st.place == DEVICE):
            continue
        if st.n_outputs > 1 or st.attrs.get("training_mode") or not all(_is_const(r) for r in st.args[1:5]):
            continue
        found = _producer_val(plan, st)
        if found is None or uses[found[1].val.key] != 1:
            continue
        prod, x = found
        scale, bias, mean, var = (r.host_value().astype(np.float64).reshape(-1) for r in st.args[1:5])
        inv = scale / np.sqrt(var + st.attrs.get("epsilon", 1e-5))
        _scale_out_channels(prod, inv, bias - mean * inv, sum(r.val.basis for r in st.args[1:5]))
        _remove(plan, st, Ref(x.val))
        folded += 1
    return f"{folded} BatchNormalization folded into the weights before them" if folded else None


_AFFINE = {"onnx::Mul", "onnx::Add", "onnx::Sub", "onnx::Div"}


def _channel_vector(c: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """``c`` as one value per channel when it broadcasts along ``axis`` only; else None."""
    if c.ndim > rank or any(d != 1 for i, d in enumerate(c.shape) if rank - c.ndim + i != axis):
        return None
    k = axis - (rank - c.ndim)
    n = c.shape[k] if 0 <= k < c.ndim else 1
    if n not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,))


def fold_channel_affine(plan, info) -> str | None:
    """Per-channel Mul/Add/Sub/Div by constants after a Conv/ConvTranspose/Gemm, through
    Transposes (which carry the channel axis along): into the weights and bias."""
    if info is None:
        return None
    folded = 0
    for prod in [p for p in plan.steps if isinstance(p, OpStep) and p.spec.name in _FOLD_INTO and _foldable(p)]:
        folded += _fold_chain_after(plan, prod, info)
    return f"{folded} per-channel scale or shift folded into the weights before them" if folded else None


def _fold_chain_after(plan, prod: OpStep, info) -> int:
    shape = info.get(prod.key, (None,))[0]
    if shape is None:
        return 0
    rank, axis, channels, done = len(shape), 1, shape[1], 0
    key = prod.key
    while True:
        uses = _uses(plan)
        readers = _readers(plan, key)
        if uses[key] != 1 or len(readers) != 1:
            return done
        st = readers[0]
        if isinstance(st, OpStep) and st.spec.name == "onnx::Transpose" and st.args[0].val.key == key:
            perm = st.attrs.get("perm") or tuple(reversed(range(rank)))
            axis, key = list(perm).index(axis), st.key
            continue
        if not (isinstance(st, OpStep) and st.spec.name in _AFFINE and st.place == DEVICE):
            return done
        pos = 0 if st.args[0].val.key == key else 1
        other = st.args[1 - pos]
        if not _is_const(other) or (pos == 1 and st.spec.name in ("onnx::Sub", "onnx::Div")):
            return done
        v = _channel_vector(other.host_value(), rank, axis, channels)
        if v is None or (st.spec.name == "onnx::Div" and not np.all(v)):
            return done
        scale = {"onnx::Mul": v, "onnx::Div": 1 / v}.get(st.spec.name, np.ones(channels))
        shift = {"onnx::Add": v, "onnx::Sub": -v}.get(st.spec.name, np.zeros(channels))
        _scale_out_channels(prod, scale, shift, other.val.basis)
        _remove(plan, st, st.args[pos])
        done += 1


# --------------------------------------------------------------------------- #
# Padding into the convolution
# --------------------------------------------------------------------------- #
def _follow_transposes(plan, key, axes: list[int], rank: int):
    """From the value ``key``, through Transposes that alone read it: the last value's key,
    where ``axes`` moved to, and the step reading that value (None unless exactly one)."""
    while True:
        readers = _readers(plan, key)
        if _uses(plan)[key] != 1 or len(readers) != 1:
            return key, axes, None
        st = readers[0]
        if isinstance(st, OpStep) and st.spec.name == "onnx::Transpose" and st.args[0].val.key == key:
            perm = list(st.attrs.get("perm") or reversed(range(rank)))
            axes, key = [perm.index(a) for a in axes], st.key
            continue
        return key, axes, st


def _pads_of(st) -> list[int] | None:
    """A constant-mode zero Pad's pads (begin..., end...), or None for any other Pad."""
    if st.attrs.get("mode", "constant") != "constant" or st.attrs.get("value") not in (None, 0, 0.0):
        return None
    args = list(st.args) + [None] * 3
    pads = st.attrs.get("pads")
    if pads is None and _is_const(args[1]):
        pads = args[1].host_value()
    if pads is None or args[3] is not None or (args[2] is not None and not (
            _is_const(args[2]) and np.all(args[2].host_value() == 0))):
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    return pads if all(p >= 0 for p in pads) else None


def fold_pad(plan, info) -> str | None:
    """A zero Pad of spatial axes before a Conv (through Transposes): into the Conv's pads."""
    if info is None:
        return None
    folded = 0
    for st in [s for s in plan.steps if isinstance(s, OpStep) and s.spec.name == "onnx::Pad" and s.place == DEVICE]:
        pads = _pads_of(st)
        shape = info.get(st.key, (None,))[0]
        if pads is None or shape is None or len(pads) != 2 * len(shape):
            continue
        rank = len(shape)
        key, axes, conv = _follow_transposes(plan, st.key, list(range(rank)), rank)
        if not (isinstance(conv, OpStep) and conv.spec.name == "onnx::Conv" and conv.args[0].val.key == key
                and conv.attrs.get("auto_pad", "NOTSET") == "NOTSET"):
            continue
        # pads of the conv's input axes: axes[i] is where input axis i of the Pad went
        at = {axes[i]: (pads[i], pads[i + rank]) for i in range(rank)}
        if at.get(0, (0, 0)) != (0, 0) or at.get(1, (0, 0)) != (0, 0):
            continue                      # batch or channel padding: not a conv's
        nsp = rank - 2
        old = list(conv.attrs.get("pads") or (0,) * (2 * nsp))
        conv.attrs = {**conv.attrs, "pads": tuple(old[i] + at[2 + i][0] for i in range(nsp))
                      + tuple(old[nsp + i] + at[2 + i][1] for i in range(nsp))}
        _remove(plan, st, st.args[0])
        folded += 1
    return f"{folded} zero Pad folded into the convolution after it" if folded else None


# --------------------------------------------------------------------------- #
# Elementwise fusion
# --------------------------------------------------------------------------- #
def recognise_caps(plan, info) -> str | None:
    """Where(GreaterOrEqual(c, a), a, c), c a constant (the Keras converter's min(x, c)):
    one fusible op (fmin, which gives c for a NaN a, as the Where does)."""
    if info is None:
        return None
    done = 0
    uses = _uses(plan)
    for st in list(plan.steps):
        if not (isinstance(st, OpStep) and st.spec.name == "onnx::Where" and st.place == DEVICE):
            continue
        cond, a, c = st.args
        ge = _producer(plan, cond.val.key)
        if not (isinstance(ge, OpStep) and ge.spec.name == "onnx::GreaterOrEqual" and uses[ge.key] == 1):
            continue
        if not (_is_const(c) and c.host_value().size == 1 and np.isfinite(c.host_value()).all()):
            continue
        if not (ge.args[1].val is a.val and ge.args[1].index == a.index and _is_const(ge.args[0])
                and np.array_equal(ge.args[0].host_value(), c.host_value())):
            continue
        dtype = info.get(st.key, (None, None))[1]
        if dtype is None or np.dtype(dtype) not in KERNEL_DTYPES or c.host_value().dtype != np.dtype(dtype):
            continue
        at = plan.steps.index(st)
        plan.steps[at] = FusedStep(st.key, DEVICE, [a, c], f"{st.what} (min with a constant)",
                                   program=(Instr("gpu_mdf::CapAt", 0, 1),), dtype=np.dtype(dtype))
        plan.steps.remove(ge)
        _changed(plan)
        done += 1
    return f"{done} Where(x <= c, x, c) run as min(x, c)" if done else None


def bias_to_epilogue(plan, info) -> str | None:
    """The constant bias of a Conv/ConvTranspose/Gemm, when elementwise work or a softmax
    follows (through Transposes): added there instead, in the same fused pass (on a GPU one
    kernel launch fewer per layer; the same arithmetic)."""
    if info is None:
        return None
    moved = 0
    for p in [s for s in plan.steps if isinstance(s, OpStep) and s.spec.name in _FOLD_INTO and s.place == DEVICE]:
        shape = info.get(p.key, (None,))[0]
        if shape is None or len(p.args) < 3 or not _is_const(p.args[2]) or len(shape) < 2:
            continue
        if p.spec.name == "onnx::Gemm" and p.attrs.get("alpha", 1.0) != 1.0:
            continue
        bias = p.args[2].host_value()
        if bias.size != shape[1] or (p.spec.name == "onnx::Gemm" and bias.ndim == 2 and bias.shape[0] != 1):
            continue
        key, (axis,), reader = _follow_transposes(plan, p.key, [1], len(shape))
        if reader is None or not (_link(reader, info) or _tail_of(reader, info)):
            continue
        dtype = info.get(key, (None, None))[1]
        if dtype is None or np.dtype(dtype) != bias.dtype:
            continue
        if p.spec.name == "onnx::Gemm":
            bias = bias * bias.dtype.type(p.attrs.get("beta", 1.0))
        b = _const(bias.reshape((-1,) + (1,) * (len(shape) - 1 - axis)), p.args[2].val.basis, f"{p.what}: bias")
        val = Val(("epilogue", p.key), DEVICE, what=f"{p.what} + bias")
        x = next(r for r in reader.args if r is not None and r.val.key == key)
        add = FusedStep(val.key, DEVICE, [x, b], f"{p.what}: bias", program=(Instr("onnx::Add", 0, 1),),
                        dtype=np.dtype(dtype))
        plan.steps.insert(plan.steps.index(reader), add)
        reader.args = [Ref(val) if r is not None and r.val.key == key else r for r in reader.args]
        info[val.key] = info[key]
        p.args = list(p.args[:2])
        _changed(plan)
        moved += 1
    return f"{moved} biases added in the elementwise pass after their layer" if moved else None


def _link(st, info):
    """(program, operands) of a step that can join a fused chain: a fusible float op whose
    operands all have its type (Clip's constant bounds become attributes), or a fused step
    without a tail; None otherwise."""
    dtype = info.get(st.key, (None, None))[1]
    if dtype is None or np.dtype(dtype) not in KERNEL_DTYPES or st.place != DEVICE:
        return None
    if isinstance(st, FusedStep):
        return (st.program, list(st.args)) if st.tail is None else None
    if not isinstance(st, OpStep):
        return None
    name, args = st.spec.name, list(st.args)
    attrs = {a: st.attrs.get(a) for a in FUSIBLE[name].attrs} if name in FUSIBLE else {}
    if name == "onnx::Clip":
        args += [None] * (3 - len(args))
        for k, bound in ((1, "min"), (2, "max")):
            r = args[k]
            if r is not None:
                if not (_is_const(r) and r.host_value().size == 1):
                    return None
                attrs[bound] = float(r.host_value().reshape(-1)[0])
        args = args[:1]
    if not fusible(name, attrs) or len(args) != FUSIBLE[name].arity or any(r is None for r in args):
        return None
    if any(_dtype_of(r, info) != np.dtype(dtype) for r in args):
        return None
    program = (Instr(name, 0, 1 if len(args) == 2 else None, tuple((a, float(v)) for a, v in attrs.items())),)
    return program, args


def _dtype_of(r: Ref, info):
    if r.place == CONST:
        v = r.host_value()
        return v.dtype if isinstance(v, np.ndarray) else None
    d = info.get(r.val.key, (None, None))[1]
    return np.dtype(d) if d and r.index is None else None


def _tail_of(st, info) -> str | None:
    """"softmax"/"logsoftmax" for a Softmax/LogSoftmax over the last axis of a float value."""
    if not (isinstance(st, OpStep) and st.spec.name in ("onnx::Softmax", "onnx::LogSoftmax") and st.place == DEVICE):
        return None
    shape, dtype = info.get(st.key, (None, None))
    if shape is None or not shape or np.dtype(dtype) not in KERNEL_DTYPES:
        return None
    if st.attrs.get("axis", -1) % len(shape) != len(shape) - 1:
        return None
    return "softmax" if st.spec.name == "onnx::Softmax" else "logsoftmax"


def _row_kind(r: Ref, shape, info) -> str | None:
    """How the row kernel reads an operand of a chain whose result has ``shape``."""
    if r.place == CONST:
        v = r.host_value()
        if v.size == 1:
            return "scalar"
        return "row" if v.shape[-1] == shape[-1] and v.size == shape[-1] and v.ndim <= len(shape) else None
    return "full" if r.index is None and info.get(r.val.key, (None,))[0] == tuple(shape) else None


def fuse_elementwise(plan, info) -> str | None:
    """Chains of float elementwise ops whose intermediate values nothing else reads, with a
    last-axis softmax after them when there is one: one step each."""
    if info is None:
        return None
    chains = 0
    i = 0
    while i < len(plan.steps):
        chain = _chain_from(plan, plan.steps[i], info)
        last = chain[-1] if chain else plan.steps[i]
        readers = _readers(plan, last.key)
        tail_step = readers[0] if len(readers) == 1 and _uses(plan)[last.key] == 1 else None
        tail = _tail_of(tail_step, info) if tail_step is not None else None
        if tail is None and not chain and isinstance(last, OpStep):
            tail_step, tail = last, _tail_of(last, info)      # a softmax on its own
        if tail and tail_step is last:
            chain = []
        if (len(chain) >= 2 or tail) and _replace_by_fused(plan, chain, info, tail_step if tail else None):
            chains += 1
            if chain and plan.steps[i] is not chain[0]:
                continue                  # the step after the chain's first now stands at i
        i += 1
    return f"{chains} elementwise chains (or softmax rows) fused into one pass each" if chains else None


def _chain_from(plan, first, info) -> list:
    if _link(first, info) is None:
        return []
    chain = [first]
    while _uses(plan)[chain[-1].key] == 1:
        readers = _readers(plan, chain[-1].key)
        if len(readers) != 1 or _link(readers[0], info) is None:
            break
        nxt = readers[0]
        if info.get(nxt.key, (None, None))[1] != info.get(first.key, (None, None))[1]:
            break
        prog, args = _link(nxt, info)
        slots = {k for k, r in enumerate(args) if r.val.key == chain[-1].key}
        if any(k in (ins.a, ins.b) for ins in prog[1:] for k in slots):
            break                         # the chain's running result is read by its first op only
        chain.append(nxt)
    return chain


def _replace_by_fused(plan, chain: list, info, tail_step) -> bool:
    """One FusedStep computing ``chain`` (and the softmax ``tail_step``) where the last stood."""
    operands: list[Ref] = []

    def operand(r: Ref) -> int:
        for k, o in enumerate(operands):
            if o.val is r.val and o.index == r.index:
                return k
        operands.append(r)
        return len(operands) - 1
    program: list[Instr] = []
    prev = None
    for st in chain:
        prog, args = _link(st, info)
        slot = {k: (f"r{len(program) - 1}" if prev is not None and r.val.key == prev and r.index is None
                    else operand(r)) for k, r in enumerate(args)}
        base = len(program)
        for ins in prog:
            a, b = (None if o is None else f"r{int(o[1:]) + base}" if isinstance(o, str) else slot[o]
                    for o in (ins.a, ins.b))
            program.append(Instr(ins.op, a, b, ins.attrs))
        prev = st.key
    steps = list(chain)
    tail, kinds = None, ()
    if tail_step is not None:
        if not chain:
            operand(tail_step.args[0])
        tail = _tail_of(tail_step, info)
        shape = info[tail_step.key][0]
        kinds = tuple(_row_kind(r, shape, info) for r in operands)
        if None in kinds or kinds[0] != "full":
            return False
        steps.append(tail_step)
    last = steps[-1]
    what = " + ".join(s.what for s in steps)
    fused = FusedStep(last.key, DEVICE, operands, what, program=tuple(program),
                      dtype=np.dtype(info[last.key][1]), tail=tail, kinds=kinds)
    plan.steps[plan.steps.index(last)] = fused
    for st in steps[:-1]:
        plan.steps.remove(st)
    _changed(plan)
    return True


# --------------------------------------------------------------------------- #
# Pooling before a monotone chain
# --------------------------------------------------------------------------- #
def max_pool_first(plan, info) -> str | None:
    """A fused chain f that only a max pooling reads (MaxPool, or the Keras converter's
    Reshape + ReduceMax), f non-decreasing and keeping every value that is not NaN so (a
    bias, ReLU, a positive scale: Conv + bias + ReLU + BatchNormalization's algebra), its
    constants the same across each window: the pooling first, then f on its result, a
    quarter (2x2 pools) of the values. The same values: f(max x) = max f(x) for such an f,
    rounding included (each op is a correctly rounded non-decreasing function; only a
    zero's sign may differ, where a window's values round to both zeros), NaN where NaN
    (f(x) is NaN only where x is), and every window holds at least one value (checked:
    an empty window's -inf would not be f's)."""
    if info is None:
        return None
    moved = 0
    for c in [s for s in plan.steps if isinstance(s, FusedStep)]:
        shape = info.get(c.key, (None,))[0]
        if c.tail is not None or shape is None or _uses(plan)[c.key] != 1 or len(_readers(plan, c.key)) != 1:
            continue
        if info.get(c.args[0].val.key, (None,))[0] != shape or c.args[0].index is not None:
            continue                      # the chain broadcasts its input: the pooling would read another shape
        pool = _max_pool_of(plan, _readers(plan, c.key)[0], shape, info)
        if pool is None:
            continue
        steps, const_ok, pooled_shape = pool
        if not _monotone_chain(c, const_ok):
            continue
        first, last = steps[0], steps[-1]
        old = _val_of(plan, last.key)
        if old is None or pooled_shape is None:
            continue
        plan.steps.remove(c)
        first.args = [c.args[0] if r is not None and r.val.key == c.key else r for r in first.args]
        out = Val(("after pooling", c.key), DEVICE, what=c.what)
        _redirect(plan, old, Ref(out))                 # every reader of the pooling reads the chain
        info[out.key] = (pooled_shape, info[c.key][1])
        c.key = out.key
        c.args = [Ref(old, 0 if old.multi else None)] + c.args[1:]
        plan.steps.insert(plan.steps.index(last) + 1, c)
        _changed(plan)
        moved += 1
    return f"{moved} max poolings run before the elementwise chain feeding them" if moved else None


def _max_pool_of(plan, r, shape, info):
    """(the pooling steps, a test of a chain constant, the pooled shape) where ``r`` starts a
    max pooling of the chain value of ``shape`` whose windows each hold a value; None otherwise."""
    rank = len(shape)
    if not isinstance(r, OpStep) or r.place != DEVICE:
        return None
    if r.spec.name == "onnx::MaxPool" and r.n_outputs <= 1 and len(r.args) == 1 and rank >= 3:
        a = r.attrs
        k = tuple(a.get("kernel_shape") or ())
        nsp = rank - 2
        pads = tuple(a.get("pads") or (0,) * (2 * nsp))
        dil = tuple(a.get("dilations") or (1,) * nsp)
        strides = tuple(a.get("strides") or (1,) * nsp)
        if len(k) != nsp or a.get("ceil_mode") or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") \
                or len(pads) != 2 * nsp or len(strides) != nsp or len(dil) != nsp:
            return None
        from .ops.nn import _out_sizes
        out, _ = _out_sizes(shape[2:], k, strides, dil, pads)
        if not all(_windows_hold_a_value(shape[2 + i], k[i], strides[i], dil[i], pads[i], out[i]) for i in range(nsp)):
            return None
        # a constant per channel (axis 1) or a scalar
        return [r], lambda v: all(n == 1 for i, n in enumerate((1,) * (rank - v.ndim) + v.shape) if i != 1), \
            tuple(shape[:2]) + tuple(out)
    if r.spec.name != "onnx::Reshape" or _uses(plan)[r.key] != 1 or len(_readers(plan, r.key)) != 1:
        return None
    red = _readers(plan, r.key)[0]
    tiles = info.get(r.key, (None,))[0]
    if not (isinstance(red, OpStep) and red.spec.name == "onnx::ReduceMax" and red.place == DEVICE) \
            or tiles is None or not tiles or tiles[-1] != shape[-1] or 0 in tiles:
        return None
    axes = red.attrs.get("axes")
    if axes is None and len(red.args) > 1 and _is_const(red.args[1]):
        axes = red.args[1].host_value().reshape(-1).tolist()
    if not axes or any(int(ax) % len(tiles) == len(tiles) - 1 for ax in axes) or red.args[0].val.key != r.key:
        return None
    # the reshape keeps the last axis: a constant along it (or a scalar) stays one
    return [r, red], lambda v: all(n == 1 for n in v.shape[:-1]), info.get(red.key, (None,))[0]


def _windows_hold_a_value(n: int, k: int, s: int, d: int, pad: int, out: int) -> bool:
    """Whether every pooling window along one axis (``out`` of them) has a tap inside
    [0, n): a dilated window can step over a small input."""
    return all(any(0 <= o * s - pad + j * d < n for j in range(k)) for o in range(out))


def _monotone_chain(c: FusedStep, const_ok) -> bool:
    """Whether ``c`` computes f(operand 0) with f non-decreasing, every other operand a
    finite constant ``const_ok`` accepts (positive for Mul and Div: 0 x inf is NaN), and
    f(x) NaN only where x is."""
    for k, ins in enumerate(c.program):
        run = 0 if k == 0 else f"r{k - 1}"
        at = dict(ins.attrs)
        if ins.op == "onnx::Relu" or (ins.op == "onnx::Clip" and not any(np.isnan(v) for v in at.values())):
            if ins.a != run:
                return False
            continue
        if ins.op == "onnx::LeakyRelu":
            if ins.a != run or not 0 < at.get("alpha", 0.01) < np.inf:
                return False
            continue
        if ins.op in ("onnx::Add", "onnx::Mul", "gpu_mdf::CapAt"):
            other = ins.b if ins.a == run else ins.a if ins.b == run else None
        elif ins.op in ("onnx::Sub", "onnx::Div"):
            other = ins.b if ins.a == run else None
        else:
            return False
        if not isinstance(other, int) or other == 0 or not _is_const(c.args[other]):
            return False
        v = c.args[other].host_value()
        if not (np.isfinite(v).all() and const_ok(v)) or (ins.op in ("onnx::Mul", "onnx::Div") and not (v > 0).all()):
            return False
    return True


def depthwise_epilogue(plan, info) -> str | None:
    """CPU: a depthwise Conv (one input channel a group) whose value only a fused chain of
    its bias and at most two activations (Relu, Clip, min with a constant: ReLU6 in either
    converter's form) reads, through Transposes: the bias back in the conv and the
    activations inside the compiled kernel, as each value is stored (no pass of its own over
    memory). The same ops on the same values, except that the sum starts at the bias."""
    done = _conv_epilogues(plan, info, lambda w, g, c: g > 1 and g == c and w.shape[1] == 1 and w.shape[0] % g == 0)
    return f"{done} depthwise convolutions apply their bias and activation as they store" if done else None


def pointwise_epilogue(plan, info) -> str | None:
    """CPU: the same for a 1x1 Conv in one group (MobileNet's expansions and projections),
    and for a conv of a few input channels whose columns are planes (an image's 3x3 stem:
    ``nn.PLANES_UP_TO``): its product, bias and activations run a block of output rows at a
    time (``cpu.product_epilogue``), the bias and activations while the block is in cache,
    where the product and the chain after it made three passes over memory. The chain's
    operations on each value; the products to rounding."""
    from .ops.nn import PLANES_UP_TO

    def takes(w, g, c):
        return g == 1 and (w.shape[2:] == (1, 1) or (c <= PLANES_UP_TO and w.shape[2] * w.shape[3] <= 9))
    done = _conv_epilogues(plan, info, takes)
    return f"{done} 1x1 (or few-channel) convolutions apply their bias and activation a block of rows at a time" \
        if done else None


def gemm_epilogue(plan, info) -> str | None:
    """CPU: the same for a Gemm (A @ B, ``alpha`` and ``beta`` 1, no C of its own: a
    Dense layer's, its bias moved on by :func:`bias_to_epilogue`) with a constant 2-D B:
    the bias (as its C) and activations run on each block of its output rows while it is
    in cache (``cpu.product_epilogue``), where the product and the chain after it made
    two passes over memory (the reference MLP's hidden layers of 10,000 rows: 1.05x and
    1.24x)."""
    from .ops import cpu
    if info is None or not cpu.available():
        return None
    done = 0
    for gemm in [s for s in plan.steps if isinstance(s, OpStep) and s.spec.name == "onnx::Gemm"]:
        shape, dtype = info.get(gemm.key, (None, None))
        if gemm.place != DEVICE or len(gemm.args) != 2 or not _is_const(gemm.args[1]) or shape is None \
                or len(shape) != 2 or gemm.epilogue or np.dtype(dtype) not in KERNEL_DTYPES \
                or gemm.args[1].host_value().ndim != 2 \
                or float(gemm.attrs.get("alpha", 1.0)) != 1.0 or float(gemm.attrs.get("beta", 1.0)) != 1.0:
            continue
        chain = _readers(plan, gemm.key)
        chain = chain[0] if len(chain) == 1 and _uses(plan)[gemm.key] == 1 else None
        epi = _bias_and_activations(chain, gemm.key, 3, shape[1]) if isinstance(chain, FusedStep) else None
        if epi and _take_epilogue(plan, gemm, chain, epi):
            done += 1
    return f"{done} Gemms apply their bias and activation a block of rows at a time" if done else None


def _conv_epilogues(plan, info, takes) -> int:
    """Move the bias-and-activations chain after each 4-D Conv whose weights ``w``, group
    and input channels ``takes(w, group, channels)`` into the conv (its ``epilogue``)."""
    from .ops import cpu
    if info is None or not cpu.available():
        return 0
    done = 0
    for conv in [s for s in plan.steps if isinstance(s, OpStep) and s.spec.name == "onnx::Conv"]:
        x_shape, dtype = info.get(conv.args[0].val.key, (None, None)) if conv.args[0] else (None, None)
        if conv.place != DEVICE or len(conv.args) != 2 or not _is_const(conv.args[1]) or x_shape is None \
                or len(x_shape) != 4 or conv.epilogue or np.dtype(dtype) not in KERNEL_DTYPES:
            continue
        w = conv.args[1].host_value()
        if w.ndim != 4 or not takes(w, conv.attrs.get("group", 1), x_shape[1]):
            continue
        key, (axis,), chain = _follow_transposes(plan, conv.key, [1], 4)
        epi = _bias_and_activations(chain, key, axis, w.shape[0]) if isinstance(chain, FusedStep) else None
        if epi and _take_epilogue(plan, conv, chain, epi):
            done += 1
    return done


def _take_epilogue(plan, st: OpStep, chain: FusedStep, epi) -> bool:
    """Move ``chain`` (its bias and activations ``epi``, :func:`_bias_and_activations`) into
    ``st``: the bias its last input, the activations its ``epilogue``. False where the
    chain's value has no reader to redirect."""
    chain_val = _val_of(plan, chain.key)
    if chain_val is None:
        return False
    bias, basis, ops = epi
    plan.steps.remove(chain)
    _redirect(plan, chain_val, chain.args[0])
    st.args = st.args + [_const(bias, basis, f"{st.what}: bias")]
    st.epilogue = ops
    st.what = f"{st.what} + {' + '.join(op.split('::')[1] for op, *_ in ops)}"
    _changed(plan)
    return True


def _bias_and_activations(chain: FusedStep, key, axis: int, f: int):
    """(bias (F,), its basis, activations) of a chain reading ``key`` (a conv's value, its channels on
    ``axis``): Add(x, a constant along that axis) and then at most two Relu, Clip or
    min-with-a-constant; None for any other chain."""
    prog = chain.program
    if chain.tail or chain.args[0].val.key != key or chain.args[0].index is not None or not 2 <= len(prog) <= 3:
        return None
    bias = _channel_bias(chain, prog[0], axis, f)
    if bias is None:
        return None
    ops = []
    for k, ins in enumerate(prog[1:], start=1):
        at = dict(ins.attrs)
        if ins.a != f"r{k - 1}":
            return None
        if ins.op == "onnx::Relu":
            ops.append((ins.op,))
        elif ins.op == "onnx::Clip" and not any(np.isnan(v) for v in at.values()):
            ops.append((ins.op, at.get("min", -np.inf), at.get("max", np.inf)))
        elif ins.op == "gpu_mdf::CapAt" and isinstance(ins.b, int) and _is_const(chain.args[ins.b]) \
                and chain.args[ins.b].host_value().size == 1:
            ops.append((ins.op, float(chain.args[ins.b].host_value().reshape(-1)[0])))
        else:
            return None
    return bias + (tuple(ops),)


def _channel_bias(chain: FusedStep, add: Instr, axis: int, f: int):
    """(bias (F,), its basis) where ``add``, an instruction of ``chain`` on its first
    operand, is Add(x, a constant of F values along ``axis``); else None."""
    other = add.b if add.a == 0 else add.a if add.b == 0 else None
    if add.op != "onnx::Add" or not isinstance(other, int) or other == 0 or not _is_const(chain.args[other]):
        return None
    bias = chain.args[other].host_value()
    shape = (1,) * (4 - bias.ndim) + bias.shape
    if bias.ndim > 4 or bias.size != f or shape[axis] != f:
        return None
    return bias.reshape(-1), chain.args[other].val.basis


def move_transposes(plan, info) -> str | None:
    """A Transpose whose value only an elementwise chain reads (no softmax tail) moves after
    the chain: the chain reads the Transpose's input, its constants permuted the inverse
    way (a bias along NHWC's last axis becomes one along NCHW's channels), an operand that
    is the same Transpose of another value reads that value; the Transpose then reads the
    chain's result, for the chain's readers. Elementwise ops commute with a permutation of
    all their operands: the same values. Run before :func:`cancel_transposes`, which then
    removes the pair the moved Transpose makes with the one after the chain (the Keras
    converter's NHWC chain between two convs)."""
    done = 0
    for chain in [s for s in plan.steps if isinstance(s, FusedStep) and not s.tail and s.place == DEVICE]:
        first = chain.args[0]
        t = _producer(plan, first.val.key) if first is not None and first.index is None else None
        if not _is_transpose(t) or _readers(plan, t.key) != [chain] \
                or any(o.ref.val.key == t.key for o in plan.outputs) or _val_of(plan, chain.key) is None:
            continue
        rank = _rank(info, t.args[0].val.key, t)
        if rank is None:
            continue
        perm = list(t.attrs.get("perm") or reversed(range(rank)))
        inverse = [perm.index(i) for i in range(rank)]
        args = []
        for r in chain.args:
            if r is not None and r.val.key == t.key:
                args.append(t.args[0])
            elif _is_const(r):
                c = np.asarray(r.host_value())
                if c.ndim > rank:
                    break
                c = c if c.ndim == 0 else c.reshape((1,) * (rank - c.ndim) + c.shape).transpose(inverse)
                args.append(_const(np.ascontiguousarray(c), r.val.basis, r.val.what))
            else:
                other = _producer(plan, r.val.key) if r is not None and r.index is None else None
                if not _is_transpose(other) or _rank(info, other.args[0].val.key, other) != rank \
                        or list(other.attrs.get("perm") or reversed(range(rank))) != perm:
                    break                                       # (a perm-less Transpose's perm is its rank's)
                args.append(other.args[0])
        else:
            chain_val, t_val = _val_of(plan, chain.key), _val_of(plan, t.key)
            if info is not None and chain.key in info and t.args[0].val.key in info:   # the shapes they have now
                info[t.key], info[chain.key] = info[chain.key], (info[t.args[0].val.key][0], info[chain.key][1])
            _redirect(plan, chain_val, Ref(t_val))              # the chain's readers read the Transpose
            chain.args = args
            t.args = [Ref(chain_val)]
            plan.steps.remove(t)
            plan.steps.insert(plan.steps.index(chain) + 1, t)
            _changed(plan)
            for st in [s for s in plan.steps if _is_transpose(s) and _uses(plan)[s.key] == 0]:
                plan.steps.remove(st)                           # an operand's Transpose nothing reads now
            _changed(plan)
            done += 1
    return f"{done} Transposes moved after the elementwise chain reading them" if done else None


def _is_transpose(st) -> bool:
    return isinstance(st, OpStep) and st.spec.name == "onnx::Transpose" and st.place == DEVICE and bool(st.args) \
        and st.args[0] is not None and st.args[0].index is None


def cancel_transposes(plan, info) -> str | None:
    """A Transpose of a Transpose's value reads the first one's input through the two
    permutations composed: none where they undo each other (the Keras converter's NCHW ->
    NHWC -> NCHW around every layer, left adjacent once the chains between them moved into
    the convs), one Transpose otherwise; the first goes where nothing else reads it. A
    Reshape of a Reshape's value with a constant shape of no 0 (which would copy a dimension
    of the value between) reads the first one's input: C order both, the same values. The
    same arrays as views: nothing is computed."""
    cancelled = merged = reshapes = 0
    changed = True
    while changed:
        changed = False
        for st in list(plan.steps):
            if not isinstance(st, OpStep) or st.spec.name not in ("onnx::Transpose", "onnx::Reshape") \
                    or not st.args or st.args[0] is None or st.args[0].index is not None:
                continue
            first = _producer(plan, st.args[0].val.key)
            if not isinstance(first, OpStep) or first.spec.name != st.spec.name or not first.args \
                    or first.args[0] is None or first.place != st.place:
                continue
            if st.spec.name == "onnx::Reshape":
                shape = st.args[1].host_value() if len(st.args) > 1 and _is_const(st.args[1]) else None
                if shape is None or np.any(np.asarray(shape) == 0):
                    continue
                st.args = [first.args[0]] + list(st.args[1:])
                reshapes += 1
            else:
                rank = _rank(info, first.args[0].val.key, first, st)
                if rank is None:
                    continue
                p1 = list(first.attrs.get("perm") or reversed(range(rank)))
                p2 = list(st.attrs.get("perm") or reversed(range(rank)))
                perm = [p1[j] for j in p2]
                if perm == list(range(rank)):
                    if any(o.ref.val.key == st.key for o in plan.outputs):
                        continue                  # a graph output stays a value of its own
                    val = _val_of(plan, st.key)
                    plan.steps.remove(st)
                    if val is not None:
                        _redirect(plan, val, first.args[0])
                    cancelled += 1
                else:
                    st.args = [first.args[0]]
                    st.attrs = {**st.attrs, "perm": perm}
                    merged += 1
            _changed(plan)
            if _uses(plan)[first.key] == 0:
                plan.steps.remove(first)
            _changed(plan)
            changed = True
    notes = [f"{cancelled} Transpose pairs that undo each other removed" if cancelled else "",
             f"{merged} Transposes of a Transpose made one" if merged else "",
             f"{reshapes} Reshapes of a Reshape read its input" if reshapes else ""]
    return "; ".join(n for n in notes if n) or None


def _rank(info, key, *steps) -> int | None:
    """The rank of the value ``key`` (the compile-time probe's shape, or the steps' perms)."""
    shape = info.get(key, (None, None))[0] if info else None
    if shape is not None:
        return len(shape)
    perms = [st.attrs.get("perm") for st in steps if st.attrs.get("perm") is not None]
    return len(perms[0]) if perms else None


def expand_depthwise(plan, info) -> str | None:
    """CPU, after every other pass: a 1x1 Conv in one group, stride 1, no pads, whose bias
    and activations already run with it (:func:`pointwise_epilogue`), and the depthwise
    Conv (a multiplier of 1, its own bias and activations inside its kernel) that alone
    reads its value become one step (:class:`~gpu_mdf.engine.steps.ExpandDepthwiseStep`),
    with the 1x1 projection (its bias, if :func:`bias_to_epilogue` left it there, added
    as it is stored; no activation) that alone reads the depthwise conv's value where
    there is one: one image at a time, the expanded and depthwise images in cache between
    them (an inverted residual's expansion holds 6x the values of its input, which the
    convs wrote to memory and read back whole). A depthwise conv with no expansion before
    it (MobileNetV2's first block) and its projection become one step too. The same
    operations on the same values, the products to rounding (SciPy's BLAS, an image at a
    time)."""
    from .ops import cpu
    if info is None or not cpu.available():
        return None
    done = projected = residual = alone = 0
    for dw in [s for s in plan.steps if isinstance(s, OpStep) and s.spec.name == "onnx::Conv"]:
        if not _depthwise_fusible(plan, info, dw):
            continue
        ex = _producer(plan, dw.args[0].val.key) if dw.args[0].index is None else None
        pr = _projection_of(plan, dw)
        if _expansion_fusible(plan, info, ex, dw):
            fused = ExpandDepthwiseStep(dw.key, DEVICE, list(ex.args) + list(dw.args[1:]),
                                        f"{ex.what} -> {dw.what}", expand=ex, depthwise=dw)
            plan.steps.remove(ex)
            done += 1
        elif pr is not None:
            fused = ExpandDepthwiseStep(dw.key, DEVICE, list(dw.args), dw.what, depthwise=dw)
            alone += 1
        else:
            continue
        plan.steps[plan.steps.index(dw)] = fused
        _changed(plan)
        if pr is not None:
            fused.project, fused.key = pr, pr.key               # the projection too
            fused.args = fused.args + list(pr.args[1:])
            fused.what = f"{fused.what} -> {pr.what}"
            plan.steps.remove(pr)
            _changed(plan)
            projected += 1
            residual += _residual_add(plan, info, fused)
    if not done and not alone:
        return None
    return f"{done} expansions and the depthwise convolutions after them ({projected - alone} with the projection " \
           f"after that, {residual} with the residual connection's Add) run an image at a time" \
           + (f"; {alone} depthwise convolutions with no expansion, and their projections, too" if alone else "")


def _depthwise_fusible(plan, info, dw) -> bool:
    """Whether ``dw`` is a depthwise Conv the fused kernel takes: its bias and activations
    inside it, constant weights (C, 1, KH, KW) of the kernels' types, 4-D."""
    from .ops import cpu
    if not (dw.epilogue and len(dw.args) == 3 and dw.place == DEVICE and dw.args[0] is not None
            and all(_is_const(r) for r in dw.args[1:])):
        return False
    shape, dtype = info.get(dw.args[0].val.key, (None, None))
    wd = dw.args[1].host_value()
    return shape is not None and len(shape) == 4 and np.dtype(dtype) in KERNEL_DTYPES and wd.ndim == 4 \
        and wd.shape[1] == 1 and dw.attrs.get("group", 1) == wd.shape[0] \
        and cpu.products_available()             # (SciPy imported at the first candidate only)


def _expansion_fusible(plan, info, ex, dw) -> bool:
    """Whether ``ex``, the step making ``dw``'s input, is a 1x1 expansion the fused kernel
    takes: one group, stride 1, no pads, its bias and activations inside it, constant
    weights, read by ``dw`` alone."""
    from .ops.nn import plain_pointwise
    if not (isinstance(ex, OpStep) and ex.spec.name == "onnx::Conv" and ex.epilogue and len(ex.args) == 3
            and ex.place == DEVICE and all(_is_const(r) for r in ex.args[1:]) and _uses(plan)[ex.key] == 1):
        return False
    we = ex.args[1].host_value()
    return we.ndim == 4 and we.shape[2:] == (1, 1) and we.shape[0] == dw.args[1].host_value().shape[0] \
        and plain_pointwise(ex.attrs) and len(info.get(ex.key, (None, None))[0] or ()) == 4


def _projection_of(plan, dw):
    """The 1x1 Conv (one group, stride 1, no pads, no activation, constant weights) that
    alone reads ``dw``'s value, or None."""
    from .ops.nn import plain_pointwise
    pr = _readers(plan, dw.key)
    pr = pr[0] if len(pr) == 1 and _uses(plan)[dw.key] == 1 else None
    if isinstance(pr, OpStep) and pr.spec.name == "onnx::Conv" and pr.place == DEVICE and len(pr.args) in (2, 3) \
            and pr.args[0].val.key == dw.key and pr.args[0].index is None and not pr.epilogue \
            and all(_is_const(r) for r in pr.args[1:]) and pr.args[1].host_value().ndim == 4 \
            and pr.args[1].host_value().shape[1:] == (dw.args[1].host_value().shape[0], 1, 1) \
            and plain_pointwise(pr.attrs):
        return pr
    return None


def _residual_add(plan, info, fused) -> int:
    """Take into ``fused`` (an :class:`ExpandDepthwiseStep` with its projection) the chain
    that alone reads its value where that chain is the projection's bias (where the conv
    has none) and then the residual connection's Add of the block's input (the
    expansion's, of the same shape): ``(y + b) + x``, the kernel's order. 1 if it did."""
    chain = _readers(plan, fused.key)
    chain = chain[0] if len(chain) == 1 and _uses(plan)[fused.key] == 1 else None
    shape, dtype = info.get(fused.key, (None, None))
    if not isinstance(chain, FusedStep) or chain.tail or chain.place != DEVICE or chain.args[0].val.key != fused.key \
            or chain.args[0].index is not None or shape is None or np.dtype(chain.dtype) != np.dtype(dtype):
        return 0
    prog, x, bias = chain.program, fused.args[0], None
    if len(prog) == 2 and len(fused.project.args) == 2:
        bias = _channel_bias(chain, prog[0], 1, fused.project.args[1].host_value().shape[0])
        if bias is None:
            return 0
    elif len(prog) != 1:
        return 0
    add, prev = prog[-1], 0 if len(prog) == 1 else "r0"
    other = add.b if add.a == prev else add.a if add.b == prev else None
    if add.op != "onnx::Add" or not isinstance(other, int) or other == 0 or chain.args[other] is None \
            or (chain.args[other].val.key, chain.args[other].index) != (x.val.key, x.index) \
            or info.get(x.val.key, (None,))[0] != shape:
        return 0
    if bias is not None:
        fused.args = fused.args + [_const(bias[0], bias[1], f"{fused.what}: bias")]
    fused.residual, fused.key = chain, chain.key
    fused.what = f"{fused.what} + {chain.what}"
    plan.steps.remove(chain)
    _changed(plan)
    return 1


#: Winograd's F(2x2, 3x3) where it was measured faster than im2col and one GEMM (one
#: thread, blocks of 2-13 images, with at least cpu.WINOGRAD_MIN_TILES tiles): from 128
#: input channels 1.15-1.45x (the 16 GEMMs have C as their inner size; at 64 channels
#: OpenBLAS runs them too slowly: 0.85-1.3x, at 32 0.5x)
WINOGRAD_MIN_IN, WINOGRAD_MIN_OUT = 128, 64


def winograd_convs(plan, info) -> str | None:
    """CPU: a 3x3 Conv of stride and dilation 1 in one group, with constant weights of at
    least :data:`WINOGRAD_MIN_IN` input and :data:`WINOGRAD_MIN_OUT` output channels, runs as
    Winograd's F(2x2, 3x3) (:func:`~gpu_mdf.engine.ops.cpu.winograd`: 16 products a 2x2
    block of outputs where im2col makes 36), where the compiled kernels run."""
    from .ops import cpu
    if info is None or not cpu.available():
        return None
    done = 0
    for st in plan.steps:
        if not (isinstance(st, OpStep) and st.spec.name == "onnx::Conv" and st.place == DEVICE) \
                or len(st.args) < 2 or not _is_const(st.args[1]):
            continue
        shape, dtype = info.get(st.key, (None, None))
        w = st.args[1].host_value()
        if shape is None or np.dtype(dtype) not in KERNEL_DTYPES or w.ndim != 4 or w.shape[2:] != (3, 3):
            continue
        unit = all(v == 1 for k in ("strides", "dilations") for v in st.attrs.get(k) or ())
        if st.attrs.get("group", 1) != 1 or not unit:
            continue
        if w.shape[1] < WINOGRAD_MIN_IN or w.shape[0] < WINOGRAD_MIN_OUT:
            continue
        st.tuning = {**st.tuning, "winograd": True}
        st.what = f"{st.what} (Winograd F(2x2, 3x3))"
        done += 1
    return f"{done} 3x3 convolutions run as Winograd F(2x2, 3x3)" if done else None


PASSES = (fold_batchnorm, fold_channel_affine, fold_pad, recognise_caps, bias_to_epilogue, fuse_elementwise,
          max_pool_first)
#: passes for a program on the CPU only (a choice of CPU kernel)
CPU_PASSES = (depthwise_epilogue, pointwise_epilogue, gemm_epilogue, winograd_convs)


#: last, on every backend: what the passes before left adjacent
LAST_PASSES = (move_transposes, cancel_transposes)
#: after those, for a program on the CPU only: fusions of steps they made adjacent
FINAL_CPU_PASSES = (expand_depthwise,)


def optimize(plan, info, gpu: bool = False) -> list[str]:
    """Run every pass (those of :data:`CPU_PASSES` and :data:`FINAL_CPU_PASSES` for a CPU
    program only); the notes of those that changed something."""
    notes = []
    for p in PASSES + (() if gpu else CPU_PASSES) + LAST_PASSES + (() if gpu else FINAL_CPU_PASSES):
        _changed(plan)
        note = p(plan, info)
        if note:
            notes.append(f"{p.__name__}: {note}")
    _changed(plan)
    return notes


__all__ = ["CPU_PASSES", "FINAL_CPU_PASSES", "LAST_PASSES", "PASSES", "bias_to_epilogue", "cancel_transposes",
           "depthwise_epilogue", "expand_depthwise", "fold_batchnorm", "fold_channel_affine", "fold_pad",
           "fuse_elementwise", "gemm_epilogue", "max_pool_first", "move_transposes", "optimize", "pointwise_epilogue",
           "recognise_caps", "winograd_convs"]
