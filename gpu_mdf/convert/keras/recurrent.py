"""Recurrent layers (SimpleRNN, LSTM, GRU, Bidirectional), unrolled over the input's
fixed number of steps.

The input projection of all steps is one MatMul; each step is then a few ops on
(N, 1, k*units) values that keep the time axis, so that a returned sequence is a
:class:`Stack` of the steps (joined by the walker in a Concat node of its own) and the
last step one Reshape. The weights are parameters of the node, stored once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import apply_activation
from .registry import Stack, translator, weights

_RNN_KINDS = {"SimpleRNN": "simple", "LSTM": "lstm", "GRU": "gru"}


@dataclass
class _Cell:
    """One recurrent layer's cell as its steps use it: Keras's settings and the names of
    the node values holding its recurrent weights; ``tag`` prefixes every value it makes
    (``fw_``/``bw_`` for the two directions of a Bidirectional)."""
    kind: str                      # simple, lstm or gru
    units: int
    activation: object
    recurrent_activation: object   # None for a SimpleRNN
    reset_after: bool              # GRU: the reset gate applies after the recurrent matmul
    recurrent_kernel: str
    recurrent_bias: str | None     # GRU with reset_after: the bias inside the recurrent product
    tag: str


def _slice_last(b, x, lo, hi, name):
    return b.op(name, "onnx::Slice", data=x, starts=[lo], ends=[hi], axes=[-1])


def _slice_rows(b, rk, lo, hi, name):
    """Columns lo:hi of the recurrent kernel, made once per node."""
    if name not in b.memo:
        b.memo[name] = _slice_last(b, rk, lo, hi, name)
    return b.memo[name]


def _last(b, v, name):
    """(N, 1, units) -> (N, units)."""
    return b.op(name, "onnx::Reshape", data=v, shape=[0, -1])


def _rnn_steps(layer, b, x, kind: str, reverse: bool, tag: str = ""):
    """Run one recurrent layer's cell over the steps of ``x`` (N, T, F); returns the
    outputs h_t (N, 1, units) in processing order and the final states."""
    shape = b.in_shapes[0]
    if len(shape) != 3 or shape[1] is None:
        b.unsupported("an input without a fixed number of steps (the time axis is None); "
                      "the MDF graph unrolls the recurrence over a known length")
    steps = int(shape[1])
    xw, cell = _input_projection(layer.cell, b, x, kind, tag)
    h = c = None
    outs = []
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        xt = b.op(f"{tag}x{t}", "onnx::Slice", data=xw, starts=[t], ends=[t + 1], axes=[1])
        if kind == "simple":
            h = apply_activation(b, _plus_recurrence(b, cell, xt, h, t), cell.activation)
        elif kind == "lstm":
            h, c = _lstm_step(b, cell, xt, h, c, t)
        else:
            h = _gru_step(b, cell, xt, h, t)
        outs.append(h)
    return outs, ([h, c] if kind == "lstm" else [h])


def _input_projection(keras_cell, b, x, kind, tag):
    """``x @ kernel (+ bias)`` for every step at once, and the cell's recurrent values."""
    w = weights(keras_cell)
    kernel = b.param(f"{tag}kernel", w["kernel"])
    rk = b.param(f"{tag}recurrent_kernel", w["recurrent_kernel"])
    xw = b.op(f"{tag}xw", "onnx::MatMul", A=x, B=kernel)
    bias = w.get("bias")
    rbias = None
    reset_after = kind == "gru" and bool(keras_cell.reset_after)
    if bias is not None and reset_after:
        xw = b.op(f"{tag}xw_b", "onnx::Add", A=xw, B=b.param(f"{tag}input_bias", bias[0]))
        rbias = b.param(f"{tag}recurrent_bias", bias[1])
    elif bias is not None:
        xw = b.op(f"{tag}xw_b", "onnx::Add", A=xw, B=b.param(f"{tag}bias", bias))
    cell = _Cell(kind, int(keras_cell.units), keras_cell.activation,
                 keras_cell.recurrent_activation if kind != "simple" else None, reset_after, rk, rbias, tag)
    return xw, cell


def _plus_recurrence(b, cell, xt, h, t):
    """``xt + h @ recurrent_kernel`` (``xt`` alone at the first step)."""
    tag = cell.tag
    return xt if h is None else b.op(f"{tag}z{t}", "onnx::Add", A=xt,
                                     B=b.op(f"{tag}hu{t}", "onnx::MatMul", A=h, B=cell.recurrent_kernel))


def _lstm_step(b, cell, xt, h, c, t):
    """One LSTM step: the gates i, f, c, o from the quarters of the projection; returns (h, c)."""
    tag, u, act, rec = cell.tag, cell.units, cell.activation, cell.recurrent_activation
    z = _plus_recurrence(b, cell, xt, h, t)
    i = apply_activation(b, _slice_last(b, z, 0, u, f"{tag}zi{t}"), rec)
    f = apply_activation(b, _slice_last(b, z, u, 2 * u, f"{tag}zf{t}"), rec)
    g = apply_activation(b, _slice_last(b, z, 2 * u, 3 * u, f"{tag}zc{t}"), act)
    o = apply_activation(b, _slice_last(b, z, 3 * u, 4 * u, f"{tag}zo{t}"), rec)
    ig = b.op(f"{tag}ig{t}", "onnx::Mul", A=i, B=g)
    c = ig if c is None else b.op(f"{tag}c{t}", "onnx::Add", A=b.op(f"{tag}fc{t}", "onnx::Mul", A=f, B=c), B=ig)
    return b.op(f"{tag}h{t}", "onnx::Mul", A=o, B=apply_activation(b, c, act)), c


def _gru_step(b, cell, xt, h, t):
    """One GRU step: h = z * h + (1 - z) * activation(pre)."""
    tag, u = cell.tag, cell.units
    x_z, x_r, x_h = (_slice_last(b, xt, k * u, (k + 1) * u, f"{tag}x{n}{t}") for k, n in enumerate("zrh"))
    gates = _gru_gates_reset_after if cell.reset_after else _gru_gates_reset_before
    z, pre = gates(b, cell, x_z, x_r, x_h, h, t)
    hh = apply_activation(b, pre, cell.activation)
    one_minus_z = b.op(f"{tag}omz{t}", "onnx::Sub", A=b.param(f"{tag}one", np.float32(1)), B=z)
    new = b.op(f"{tag}zhh{t}", "onnx::Mul", A=one_minus_z, B=hh)
    return new if h is None else b.op(f"{tag}h{t}", "onnx::Add", A=b.op(f"{tag}zh{t}", "onnx::Mul", A=z, B=h),
                                      B=new)


def _gru_gates_reset_after(b, cell, x_z, x_r, x_h, h, t):
    """The update gate z and the candidate's pre-activation, the reset gate applied to
    ``h @ recurrent_kernel + recurrent_bias`` (Keras's default, cuDNN's form)."""
    tag, u, rec, rbias = cell.tag, cell.units, cell.recurrent_activation, cell.recurrent_bias
    hu = None if h is None else b.op(f"{tag}hu{t}", "onnx::MatMul", A=h, B=cell.recurrent_kernel)
    if rbias is not None:
        hu = rbias if hu is None else b.op(f"{tag}hub{t}", "onnx::Add", A=hu, B=rbias)
    r_z, r_r, r_h = ((None,) * 3 if hu is None else
                     (_slice_last(b, hu, k * u, (k + 1) * u, f"{tag}r{n}{t}") for k, n in enumerate("zrh")))
    z = apply_activation(b, x_z if r_z is None else b.op(f"{tag}sz{t}", "onnx::Add", A=x_z, B=r_z), rec)
    r = apply_activation(b, x_r if r_r is None else b.op(f"{tag}sr{t}", "onnx::Add", A=x_r, B=r_r), rec)
    pre = x_h if r_h is None else b.op(f"{tag}sh{t}", "onnx::Add", A=x_h,
                                       B=b.op(f"{tag}rrh{t}", "onnx::Mul", A=r, B=r_h))
    return z, pre


def _gru_gates_reset_before(b, cell, x_z, x_r, x_h, h, t):
    """The update gate z and the candidate's pre-activation, the reset gate applied to
    ``h`` before its product with the candidate's columns of the recurrent kernel."""
    tag, u, rec, rk = cell.tag, cell.units, cell.recurrent_activation, cell.recurrent_kernel
    if h is None:
        return apply_activation(b, x_z, rec), x_h
    rz = b.op(f"{tag}rz{t}", "onnx::MatMul", A=h, B=_slice_rows(b, rk, 0, u, f"{tag}uz"))
    rr = b.op(f"{tag}rr{t}", "onnx::MatMul", A=h, B=_slice_rows(b, rk, u, 2 * u, f"{tag}ur"))
    z = apply_activation(b, b.op(f"{tag}sz{t}", "onnx::Add", A=x_z, B=rz), rec)
    r = apply_activation(b, b.op(f"{tag}sr{t}", "onnx::Add", A=x_r, B=rr), rec)
    rh = b.op(f"{tag}rh{t}", "onnx::MatMul", A=b.op(f"{tag}rh_in{t}", "onnx::Mul", A=r, B=h),
              B=_slice_rows(b, rk, 2 * u, 3 * u, f"{tag}uh"))
    return z, b.op(f"{tag}sh{t}", "onnx::Add", A=x_h, B=rh)


@translator("SimpleRNN", "LSTM", "GRU")
def _rnn(layer, b, xs):
    """Unrolled over the steps: return_sequences gives every step's output (in processing
    order, as Keras does with go_backwards), return_state adds the final states."""
    outs, states = _rnn_steps(layer, b, xs[0], _RNN_KINDS[type(layer).__name__], bool(layer.go_backwards))
    states = [_last(b, v, f"state{i}") for i, v in enumerate(states)]
    first = Stack(outs) if layer.return_sequences else states[0]
    return [first, *states] if layer.return_state else first


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
    units = (int(fw.cell.units), int(bw.cell.units))
    if not layer.return_sequences:
        return _last(b, _merge_directions(b, mode, units, f_outs[-1], b_outs[-1], ""), "merged_last")
    # the backward layer's outputs come in its processing order; Keras flips them back
    f_time = f_outs if not fw.go_backwards else f_outs[::-1]
    b_time = b_outs[::-1] if bw.go_backwards else b_outs
    return Stack([_merge_directions(b, mode, units, f_time[t], b_time[t], t) for t in range(len(f_outs))])


def _merge_directions(b, mode, units, a, c, i):
    """The forward output ``a`` and the backward output ``c`` of one step merged by
    ``merge_mode``; ``units``: the two layers' sizes."""
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
        uf, ub = units
        b.memo["place"] = (b.param("place_fw", np.eye(uf, uf + ub, dtype=np.float32)),
                           b.param("place_bw", np.eye(ub, uf + ub, uf, dtype=np.float32)))
    pf, pb = b.memo["place"]
    return b.op(f"merged{i}", "onnx::Add", A=b.op(f"fw_p{i}", "onnx::MatMul", A=a, B=pf),
                B=b.op(f"bw_p{i}", "onnx::MatMul", A=c, B=pb))
