"""The optimising passes (gpu_mdf/engine/passes.py) and the kernels they generate.

* every case of the golden corpus (converter cases, ONNX imports, hand-written MDF) gives
  the same outputs optimised as written, within 1e-5 x max|y|, NaN where NaN;
* each pass on a graph made for it: it fires (``Program.describe()`` says so), the step
  it removes is gone, and the numbers match ONNX Runtime and the graph as written;
* the fused forms agree with NumPy's on NaN, infinities and signed zeros, on the CPU and
  as generated C (run on the host by the CuPy stand-in);
* on the stand-in: kernel launches per batch (reference MLP <= 6, the CNN config and
  MobileNetV2 <= 2 per Keras layer) and no new device memory per steady-state batch;
* with nvcc present, every generated CUDA source compiles to PTX.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import fake_cupy
import fused_special
import mdf_fixtures as F
import numpy as np
import pytest
from golden_corpus import CASES, load

from gpu_mdf.engine import compile
from gpu_mdf.engine.ops import cuda
from gpu_mdf.engine.ops.fusion import FUSIBLE, Instr
from gpu_mdf.engine.steps import FusedStep, OpStep


@pytest.fixture(scope="module")
def keras_cases():
    pytest.importorskip("keras")
    import test_convert as tc
    return tc


def _close(got, want, name=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype, want.dtype)
    if want.dtype.kind != "f":
        np.testing.assert_array_equal(got, want, err_msg=name)
        return
    finite = want[np.isfinite(want)]
    scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, equal_nan=True, err_msg=name)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)


def _both(model, feeds=None, **kw):
    """The program as written and optimised, and both results."""
    plain, opt = compile(model, device="cpu", optimize=False, **kw), compile(model, device="cpu", **kw)
    return plain, opt, plain.run(feeds, check=False), opt.run(feeds, check=False)


@pytest.mark.parametrize("name", CASES)
def test_optimised_equals_as_written_on_the_golden_corpus(name):
    path, feeds, consts, _ = load(name)
    _, _, want, got = _both(path, feeds or None, constants=consts)
    if isinstance(want, dict):
        assert sorted(got) == sorted(want)
        for k in want:
            _close(got[k], want[k], f"{name}:{k}")
    else:
        _close(got, want, name)


def _ops(prog):
    return [st.spec.name for st in prog.plan.steps if isinstance(st, OpStep)]


def _onnx(build, shape, opset=17):
    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    b = F.Builder()
    y = build(b)
    model = b.model("x", list(shape), [y], opset=opset)
    return model, onnx_to_mdf_doc(model)


# --------------------------------------------------------------------------- #
# Each pass
# --------------------------------------------------------------------------- #
def test_fold_batchnorm_into_conv_weights():
    def build(b):
        y = b.op("Conv", ["x", b.init("w", F.w(6, 3, 3, 3)), b.init("b", F.w(6))], pads=[1, 1, 1, 1])
        return b.op("BatchNormalization", [y, b.init("s", 1 + F.w(6)), b.init("t", F.w(6)), b.init("m", F.w(6)),
                                           b.init("v", 1 + np.abs(F.w(6)))], epsilon=1e-3)
    model, doc = _onnx(build, (2, 3, 8, 8))
    x = F.R.standard_normal((2, 3, 8, 8)).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    assert "onnx::BatchNormalization" in _ops(plain) and "onnx::BatchNormalization" not in _ops(opt)
    assert "fold_batchnorm: 1 BatchNormalization" in opt.describe()
    _close(got, want)
    np.testing.assert_allclose(got, F.run_ort(model, x), rtol=1e-4, atol=1e-5)


def _transposes_and_reshapes(b, shared):
    """x (2, 3, 4, 5): a pair of Transposes that undo each other, a pair that composes to
    one, four Reshapes in a row (each reads the first one's input in turn) but the last,
    whose shape holds a 0 (a dimension copied from the value before it: left alone); with ``shared``, the first
    Transpose's value is read by another op too (so it stays)."""
    t1 = b.op("Transpose", ["x"], perm=[0, 2, 3, 1])
    y = b.op("Relu", [b.op("Transpose", [t1], perm=[0, 3, 1, 2])])                       # NCHW again
    y = b.op("Transpose", [b.op("Transpose", [y], perm=[0, 2, 3, 1])], perm=[1, 0, 2, 3])  # one perm
    y = b.op("Reshape", [b.op("Reshape", [y, b.init("s1", np.array([-1, 20]))]), b.init("s2", np.array([6, -1]))])
    y = b.op("Reshape", [b.op("Reshape", [y, b.init("s3", np.array([24, 5]))]), b.init("s4", np.array([0, -1]))])
    outs = [b.op("Sigmoid", [y])]
    if shared:
        outs.append(b.op("Neg", [t1]))
    return outs


@pytest.mark.parametrize("shared", [False, True])
def test_cancel_transposes_removes_pairs_composes_the_rest_and_skips_reshape_pairs_with_0(shared):
    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    b = F.Builder()
    outs = _transposes_and_reshapes(b, shared)
    model = b.model("x", [2, 3, 4, 5], outs)
    doc = onnx_to_mdf_doc(model)
    x = F.R.standard_normal((2, 3, 4, 5)).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    note = "cancel_transposes: 1 Transpose pairs that undo each other removed; 1 Transposes of a Transpose made " \
           "one; 2 Reshapes of a Reshape read its input"
    assert note in opt.describe()
    assert _ops(plain).count("onnx::Transpose") == 4
    assert _ops(opt).count("onnx::Transpose") == (2 if shared else 1)      # the shared first one stays
    assert _ops(opt).count("onnx::Reshape") == 2            # s1, then s2, gone; s3 -> s4 (a 0) kept
    wants = F.run_ort_all(model, {"x": x})
    for g, w, ort_w in zip(*((v if isinstance(v, dict) else {"y": v}).values() for v in (got, want)), wants):
        _close(g, w)
        np.testing.assert_allclose(g, ort_w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_move_transposes_runs_nhwc_chains_in_the_convs_layout_and_the_pairs_cancel(device, strict_gpu):
    """The Keras converter's form: Conv -> Transpose to NHWC -> bias, ReLU (and a residual
    Add of another NHWC value, and a scalar) -> Transpose to NCHW -> Conv. The chains move
    inside the Transposes (their per-channel constants permuted), the pairs then cancel:
    no Transpose left but the input's; ONNX Runtime's values, on the CPU and the GPU stand-in.
    (On the CPU the first chain, the 3-channel conv's bias and ReLU, runs inside that conv
    first: pointwise_epilogue follows it through its Transpose; one chain then moves.)"""
    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    b = F.Builder()
    to_nhwc, to_nchw = [0, 2, 3, 1], [0, 3, 1, 2]
    y = b.op("Conv", [b.op("Transpose", ["x"], perm=to_nchw), b.init("w1", F.w(6, 3, 3, 3))], pads=[1, 1, 1, 1])
    a = b.op("Relu", [b.op("Add", [b.op("Transpose", [y], perm=to_nhwc), b.init("b1", F.w(6))])])   # NHWC
    y = b.op("Conv", [b.op("Transpose", [a], perm=to_nchw), b.init("w2", F.w(6, 6, 1, 1))])
    r = b.op("Add", [b.op("Add", [b.op("Transpose", [y], perm=to_nhwc), b.init("b2", F.w(6))]), a])  # residual
    r = b.op("Mul", [r, b.init("half", np.float32(0.5))])
    y = b.op("Conv", [b.op("Transpose", [r], perm=to_nchw), b.init("w3", F.w(4, 6, 1, 1)), b.init("b3", F.w(4))])
    model = b.model("x", [2, 7, 7, 3], [y])
    doc = onnx_to_mdf_doc(model)
    x = F.R.standard_normal((2, 7, 7, 3)).astype(np.float32)
    plain = compile(doc, device="cpu", optimize=False)
    opt = compile(doc, device="cpu" if device == "cpu" else strict_gpu)
    moved = 1 if device == "cpu" else 2
    assert f"move_transposes: {moved} Transposes moved after the elementwise chain" in opt.describe()
    assert ("pointwise_epilogue: 1" in opt.describe()) == (device == "cpu")
    assert "cancel_transposes: 2 Transpose pairs that undo each other removed" in opt.describe()   # (a third: unread)
    assert _ops(plain).count("onnx::Transpose") == 5 and _ops(opt).count("onnx::Transpose") == 1
    got = opt.run(x, check=False)
    _close(got, plain.run(x, check=False))
    np.testing.assert_allclose(got, F.run_ort(model, x), rtol=1e-5, atol=1e-5)


def test_move_transposes_leaves_a_chain_with_an_operand_in_another_layout():
    """A chain adding a value that is not the same Transpose of another (here the NHWC
    input itself) stays where it is: nothing moves, the values are ONNX Runtime's."""
    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    b = F.Builder()
    y = b.op("Conv", [b.op("Transpose", ["x"], perm=[0, 3, 1, 2]), b.init("w", F.w(3, 3, 1, 1))])
    y = b.op("Add", [b.op("Transpose", [y], perm=[0, 2, 3, 1]), "x"])
    model = b.model("x", [2, 5, 5, 3], [b.op("Relu", [y])])
    x = F.R.standard_normal((2, 5, 5, 3)).astype(np.float32)
    plain, opt, want, got = _both(onnx_to_mdf_doc(model), x)
    assert "move_transposes" not in opt.describe()
    _close(got, want)
    np.testing.assert_allclose(got, F.run_ort(model, x), rtol=1e-5, atol=1e-5)


def test_move_transposes_tells_perm_less_transposes_of_other_ranks_apart():
    """Two Transposes without a perm (each reverses its own axes) of a rank-4 and a rank-2
    value are not the same permutation: the chain stays (review: it moved and broadcast
    the 2-D value along the wrong axes)."""
    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    b = F.Builder()
    y = b.op("ReduceMax", ["x"], axes=[0, 1], keepdims=0)                  # (2, 2)
    model = b.model("x", [2, 2, 2, 2], [b.op("Relu", [b.op("Add", [b.op("Transpose", ["x"]),
                                                                  b.op("Transpose", [y])])])])
    x = F.R.standard_normal((2, 2, 2, 2)).astype(np.float32)
    plain, opt, want, got = _both(onnx_to_mdf_doc(model), x)
    assert "move_transposes" not in opt.describe()
    _close(got, want)
    np.testing.assert_allclose(got, F.run_ort(model, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("forms", ["compiled", "NumPy"])
@pytest.mark.parametrize("op", ["Sqrt", "Log"])
def test_a_fused_sigmoid_keeps_its_relative_accuracy_in_the_tail(op, forms, monkeypatch):
    """Sigmoid(-16) is 1e-7, not 0 and never negative: a Sqrt in the chain, or a Log after
    it (the sigmoid then a chain of one op), gives float64's value to float32 precision,
    with the compiled CPU kernels (sigmoid32) and with NumPy's forms (the op's own stable
    form). Review: the fused 0.5 tanh(x/2) + 0.5 gave NaN and -inf there."""
    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    if forms == "NumPy":
        monkeypatch.setenv("GPU_MDF_NUMBA", "0")
    b = F.Builder()
    model = b.model("x", [2, 8192], [b.op(op, [b.op("Sigmoid", ["x"])])])
    x = np.linspace(-30, 30, 2 * 8192, dtype=np.float32).reshape(2, 8192)
    got = compile(onnx_to_mdf_doc(model), device="cpu").run(x, check=False)
    sig = 1 / (1 + np.exp(-x.astype(np.float64)))
    want = np.sqrt(sig) if op == "Sqrt" else np.log(sig)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)        # (atol: log near 1, float32's ulp)


def test_a_transpose_pair_whose_value_is_a_graph_output_stays_its_own_value():
    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    b = F.Builder()
    y = b.op("Transpose", [b.op("Relu", ["x"])], perm=[0, 2, 1])
    y = b.op("Transpose", [y], perm=[0, 2, 1])
    model = b.model("x", [2, 3, 4], [y])
    x = F.R.standard_normal((2, 3, 4)).astype(np.float32)
    plain, opt, want, got = _both(onnx_to_mdf_doc(model), x)
    assert "cancel_transposes" not in opt.describe()
    np.testing.assert_array_equal(got, np.maximum(x, 0))
    _close(got, want)


def test_fold_channel_affine_through_a_transpose_into_gemm_and_conv():
    def build(b):
        y = b.op("Conv", ["x", b.init("w", F.w(4, 2, 3, 3))])                      # no bias: one is made
        y = b.op("Transpose", [y], perm=[0, 2, 3, 1])                                 # channels last
        y = b.op("Mul", [y, b.init("s", 1 + F.w(4))])
        y = b.op("Add", [y, b.init("t", F.w(4))])
        y = b.op("Flatten", [y], axis=1)
        y = b.op("Gemm", [y, b.init("g", F.w(4 * 6 * 6, 5)), b.init("gb", F.w(5))], beta=0.5)
        return b.op("Div", [y, b.init("d", 2 + np.abs(F.w(5)))])
    model, doc = _onnx(build, (3, 2, 8, 8))
    x = F.R.standard_normal((3, 2, 8, 8)).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    assert {"onnx::Mul", "onnx::Add", "onnx::Div"} <= set(_ops(plain))
    assert not {"onnx::Mul", "onnx::Add", "onnx::Div"} & set(_ops(opt))
    assert "3 per-channel scale or shift folded" in opt.describe()
    _close(got, want)
    np.testing.assert_allclose(got, F.run_ort(model, x), rtol=1e-4, atol=1e-5)


def test_a_scale_that_is_not_per_channel_stays():
    def build(b):
        y = b.op("Conv", ["x", b.init("w", F.w(4, 2, 3, 3))])
        return b.op("Mul", [y, b.init("s", 1 + F.w(1, 4, 6, 6))])                  # per position: not foldable
    model, doc = _onnx(build, (2, 2, 8, 8))
    x = F.R.standard_normal((2, 2, 8, 8)).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    assert "onnx::Mul" in _ops(opt) and "fold_channel_affine" not in opt.describe()
    _close(got, want)


def test_fold_pad_into_the_conv_after_it_and_not_a_reflect_pad():
    def build(b):
        p = b.op("Pad", ["x", b.init("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))])
        y = b.op("Conv", [p, b.init("w", F.w(3, 2, 3, 3)), b.init("b", F.w(3))], pads=[1, 0, 0, 1])
        r = b.op("Pad", [y, b.init("rp", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], mode="reflect")
        return b.op("Conv", [r, b.init("w2", F.w(2, 3, 3, 3))])
    model, doc = _onnx(build, (2, 2, 7, 7))
    x = F.R.standard_normal((2, 2, 7, 7)).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    assert _ops(plain).count("onnx::Pad") == 2 and _ops(opt).count("onnx::Pad") == 1
    assert "fold_pad: 1 zero Pad folded" in opt.describe()
    _close(got, want)
    np.testing.assert_allclose(got, F.run_ort(model, x), rtol=1e-4, atol=1e-5)


def test_where_min_becomes_a_cap_with_the_same_nan(keras_cases, tmp_path):
    from gpu_mdf.convert import keras_to_mdf
    tc = keras_cases
    model = tc.seq((6,), tc.layers.Dense(5), tc.layers.ReLU(max_value=1.5))
    x = tc.R.standard_normal((4, 6)).astype("float32") * 3
    x[0, 0] = np.nan
    x[1, :] = np.inf
    doc = keras_to_mdf(model)
    plain, opt, want, got = _both(doc, x)
    assert "onnx::Where" in _ops(plain) and "onnx::Where" not in _ops(opt)
    assert "recognise_caps: 1" in opt.describe()
    _close(got, want)


def test_bias_moves_into_the_activation_after_it():
    def build(b):
        y = b.op("Gemm", ["x", b.init("w", F.w(6, 5)), b.init("c", F.w(5))])
        return b.op("Relu", [b.op("Transpose", [b.op("Reshape", [y, b.init("s", np.array([-1, 5, 1], np.int64))])],
                                  perm=[0, 2, 1])])
    model, doc = _onnx(build, (4, 6))
    x = F.R.standard_normal((4, 6)).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    assert "bias_to_epilogue" not in opt.describe()           # a Reshape between: the channel is lost, left alone
    _close(got, want)

    def build2(b):
        y = b.op("Conv", ["x", b.init("w", F.w(4, 3, 1, 1)), b.init("b", F.w(4))])
        return b.op("Sigmoid", [b.op("Transpose", [y], perm=[0, 2, 3, 1])])
    model, doc = _onnx(build2, (2, 3, 5, 5))
    x = F.R.standard_normal((2, 3, 5, 5)).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    assert "bias_to_epilogue: 1" in opt.describe()
    conv = next(st for st in opt.plan.steps if isinstance(st, OpStep) and st.spec.name == "onnx::Conv")
    assert len(conv.args) == 2
    _close(got, want)
    np.testing.assert_allclose(got, F.run_ort(model, x), rtol=1e-5, atol=1e-6)


def test_chains_fuse_and_a_value_read_twice_ends_a_chain():
    def build(b):
        y = b.op("Relu", [b.op("Add", ["x", b.init("a", F.w(5))])])
        z = b.op("Sigmoid", [b.op("Mul", [y, b.init("m", F.w(5))])])
        twice = b.op("Tanh", [z])
        return b.op("Add", [b.op("Exp", [twice]), b.op("Neg", [twice])])
    model, doc = _onnx(build, (3, 5))
    x = F.R.standard_normal((3, 5)).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    fused = [st for st in opt.plan.steps if isinstance(st, FusedStep)]
    # Add-Relu-Mul-Sigmoid-Tanh (Tanh's value is read twice, by Exp and by Neg), then Exp + Add
    assert [len(st.program) for st in fused] == [5, 2]
    assert "onnx::Neg" in _ops(opt)
    _close(got, want)
    np.testing.assert_allclose(got, F.run_ort(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_becomes_the_tail_of_the_chain_before_it(op):
    def build(b):
        y = b.op("Gemm", ["x", b.init("w", F.w(7, 10)), b.init("c", F.w(10))])
        return b.op(op, [b.op("LeakyRelu", [y], alpha=0.2)], axis=-1)
    model, doc = _onnx(build, (5, 7))
    x = F.R.standard_normal((5, 7)).astype(np.float32)
    x[2, 3] = np.nan
    plain, opt, want, got = _both(doc, x)
    (fused,) = [st for st in opt.plan.steps if isinstance(st, FusedStep)]
    assert fused.tail == op.lower() and [i.op for i in fused.program] == ["onnx::Add", "onnx::LeakyRelu"]
    assert np.isnan(got[2]).all() and not np.isnan(got[[0, 1, 3, 4]]).any()
    _close(got, want)


def test_softmax_over_another_axis_is_not_a_tail():
    def build(b):
        return b.op("Softmax", [b.op("Relu", ["x"])], axis=1)
    model, doc = _onnx(build, (2, 4, 3))
    x = F.R.standard_normal((2, 4, 3)).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    assert "onnx::Softmax" in _ops(opt)
    _close(got, want)


def _pool_after(chain, pool="MaxPool", scale=None, **pool_attrs):
    """Conv -> ``chain`` (Relu, a per-channel Mul, Sigmoid...) -> a max pooling."""
    def build(b):
        y = b.op("Conv", ["x", b.init("w", F.w(6, 3, 3, 3)), b.init("b", F.w(6))], pads=[1, 1, 1, 1])
        for op in chain:
            if op == "Mul":
                y = b.op("Mul", [y, b.init(f"s{len(b.nodes)}", scale.reshape(6, 1, 1))])
            elif op == "AddPerColumn":                    # a constant along W: not the same across a window
                y = b.op("Add", [y, b.init(f"c{len(b.nodes)}", F.w(9))])
            else:
                y = b.op(op, [y])
        return b.op(pool, [y], **pool_attrs)
    return _onnx(build, (2, 3, 9, 9))


@pytest.mark.parametrize("pool_attrs", [dict(kernel_shape=[2, 2], strides=[2, 2]),
                                        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                                        dict(kernel_shape=[3, 2], strides=[1, 2], pads=[0, 1, 2, 0], dilations=[1, 2])])
def test_max_pool_runs_before_a_non_decreasing_chain_the_same_bits(pool_attrs):
    model, doc = _pool_after(["Relu", "Mul"], scale=np.abs(F.w(6)) + 0.1, **pool_attrs)
    x = F.R.standard_normal((2, 3, 9, 9)).astype(np.float32)
    x[0, 1, 4, 4], x[1, 2, 0, 7], x[1, 0, 8, 8] = np.nan, np.inf, -np.inf
    plain, opt, want, got = _both(doc, x)
    assert "max_pool_first: 1 max poolings run before" in opt.describe()
    names = [st.spec.name if isinstance(st, OpStep) else "fused" for st in opt.plan.steps]
    assert names.index("onnx::MaxPool") < names.index("fused")
    np.testing.assert_array_equal(got, want)                     # NaN where NaN, the same bits elsewhere
    finite = F.R.standard_normal((2, 3, 9, 9)).astype(np.float32)
    np.testing.assert_allclose(opt.run(finite), F.run_ort(model, finite), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["negative scale", "sigmoid", "constant along W", "ceil_mode", "indices read"])
def test_max_pool_stays_after_a_chain_it_does_not_commute_with(case):
    scale = np.abs(F.w(6)) + 0.1
    pool_attrs = dict(kernel_shape=[2, 2], strides=[2, 2])
    chain = ["Relu", "Mul"]
    if case == "negative scale":
        scale[3] = -scale[3]                                     # max(-x) is -min(x)
    elif case == "sigmoid":
        chain = ["Sigmoid", "Relu"]                              # a library function: monotone, not promised
    elif case == "constant along W":
        chain = ["Relu", "AddPerColumn"]
    elif case == "ceil_mode":
        pool_attrs["ceil_mode"] = 1
    model, doc = _pool_after(chain, scale=scale, **pool_attrs)
    if case == "indices read":                                   # MaxPool's Indices are an output too
        import onnx

        from gpu_mdf.convert.onnx import onnx_to_mdf_doc
        node = model.graph.node[-1]
        node.output.append("indices")
        model.graph.output.append(onnx.helper.make_tensor_value_info("indices", onnx.TensorProto.INT64, [2, 6, 4, 4]))
        doc = onnx_to_mdf_doc(model)
    x = F.R.standard_normal((2, 3, 9, 9)).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    assert "max_pool_first" not in opt.describe()
    for a, b in zip(*(v.values() if isinstance(v, dict) else [v] for v in (got, want))):
        _close(a, b)


def test_max_pool_stays_where_a_window_could_be_empty_or_the_chain_broadcasts():
    """A dilated window can step over a small input (its max is -inf, not f(-inf)); a chain
    whose constant broadcasts its input to a larger shape cannot hand the pooling its input."""
    def empty_window(b):
        y = b.op("Relu", [b.op("Add", ["x", b.init("c", F.w(3, 1, 1))])])
        return b.op("MaxPool", [y], kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 1, 1, 1])

    def broadcast(b):
        y = b.op("Relu", [b.op("Add", ["x", b.init("c", F.w(1, 3, 1, 1))])])
        return b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    for build, shape in ((empty_window, (1, 3, 1, 1)), (broadcast, (2, 1, 6, 6))):
        model, doc = _onnx(build, shape)
        x = F.R.standard_normal(shape).astype(np.float32)
        plain, opt, want, got = _both(doc, x)
        assert "max_pool_first" not in opt.describe()
        np.testing.assert_array_equal(got, want)


def test_keras_pooling_as_reshape_and_reducemax_runs_before_the_chain():
    """The Keras converter's form: channels last, Reshape to 2x2 tiles, ReduceMax over them."""
    def build(b, axes):
        y = b.op("Add", ["x", b.init("bias", F.w(4))])
        y = b.op("Relu", [b.op("Mul", [y, b.init("s", np.abs(F.w(4)) + 0.2)])])
        t = b.op("Reshape", [y, b.init("shape", np.array([-1, 3, 2, 4, 2, 4], np.int64))])
        return b.op("ReduceMax", [t], axes=axes, keepdims=0)
    x = F.R.standard_normal((2, 6, 8, 4)).astype(np.float32)
    for axes, fires in (([2, 4], True), ([4, 5], False)):        # over the channels: not a pooling
        model, doc = _onnx(lambda b, axes=axes: build(b, axes), (2, 6, 8, 4), opset=13)
        plain, opt, want, got = _both(doc, x)
        assert ("max_pool_first: 1" in opt.describe()) == fires
        np.testing.assert_array_equal(got, want) if fires else _close(got, want)
        np.testing.assert_allclose(got, F.run_ort(model, x), rtol=1e-5, atol=1e-6)


def _activation(b, y, act: str):
    """``act`` after ``y``: torchvision's Clip(0, 6), the Keras converter's Relu +
    Where(6 >= x, x, 6) ("Relu+Where"), a Relu, or a Sigmoid (no epilogue op)."""
    if act == "Clip":
        return b.op("Clip", [y, b.init(f"lo{id(y)}", np.float32(0)), b.init(f"hi{id(y)}", np.float32(6))])
    if act == "Sigmoid":
        return b.op("Sigmoid", [y])
    y = b.op("Relu", [y])
    if act == "Relu":
        return y
    six = b.init(f"six{id(y)}", np.float32(6))
    return b.op("Where", [b.op("GreaterOrEqual", [six, y]), y, six])


@pytest.mark.parametrize("act", ["Clip", "Relu+Where", "Relu", "Sigmoid"])
@pytest.mark.parametrize("layer", ["depthwise", "1x1", "stem"])
def test_conv_epilogues_run_relu6_with_the_conv(layer, act, strict_gpu, monkeypatch):
    """torchvision's Clip(0, 6) and the Keras converter's Relu + Where(6 >= x, x, 6) after a
    depthwise conv (its bias in the chain after it) move into its kernel
    (depthwise_epilogue); after a 1x1 conv (a MobileNet expansion) they run on each block
    of its output rows (pointwise_epilogue, cpu.product_epilogue), where after a 3x3 conv
    they stay a chain; after a 3-channel 3x3 stem (stride 2), on each image's output
    (cpu.conv_images); a Sigmoid moves nowhere (not an epilogue op). The numbers: as
    written, ONNX Runtime, and the optimised program exported to ONNX (the activations are
    written out again)."""
    from gpu_mdf.engine.onnx_export import to_onnx
    from gpu_mdf.engine.ops import cpu
    if not cpu.available():
        pytest.skip(f"compiled CPU kernels off here: {cpu.describe()}")

    ran, call = [], cpu._call
    monkeypatch.setattr(cpu, "_call", lambda kernel, *a: ran.append(kernel) or call(kernel, *a))

    def build(b):
        if layer == "depthwise":
            y = b.op("Conv", ["x", b.init("w", F.w(8, 1, 3, 3)), b.init("b", F.w(8))], group=8, pads=[1, 1, 1, 1])
            return _activation(b, y, act)
        if layer == "stem":
            y = b.op("Conv", ["x", b.init("w", F.w(16, 3, 3, 3)), b.init("b", F.w(16))], strides=[2, 2],
                     pads=[0, 0, 1, 1])
            return _activation(b, y, act)
        y = b.op("Conv", ["x", b.init("w", F.w(24, 8, 1, 1)), b.init("b", F.w(24))])
        y = b.op("Conv", [y, b.init("w3", F.w(8, 24, 3, 3)), b.init("b3", F.w(8))], pads=[1, 1, 1, 1])
        y = b.op("Relu", [y])                                  # after a 3x3 conv: a chain still
        y = b.op("Conv", [y, b.init("w2", F.w(16, 8, 1, 1)), b.init("b2", F.w(16))])
        return _activation(b, y, act)
    shape = (2, 3, 13, 11) if layer == "stem" else (2, 8, 7, 9)
    model, doc = _onnx(build, shape)
    x = (F.R.standard_normal(shape) * 8).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    fires = act != "Sigmoid"
    note, chains = {"depthwise": ("depthwise_epilogue: 1 depthwise convolutions", 1),
                    "1x1": ("pointwise_epilogue: 1 1x1 (or few-channel) convolutions", 2),
                    "stem": ("pointwise_epilogue: 1 1x1 (or few-channel) convolutions", 1)}[layer]
    if layer == "stem" and cpu.products_available():
        assert "conv images 3x3 3" in ran
    assert (note in opt.describe()) == fires
    assert sum(bool(getattr(st, "epilogue", ())) for st in opt.plan.steps) == fires
    assert sum(isinstance(st, FusedStep) for st in opt.plan.steps) == chains - fires
    _close(got, want)
    if act in ("Clip", "Relu+Where"):
        assert (want == 6).any() and (want == 0).any()
    np.testing.assert_allclose(got, F.run_ort(model, x), rtol=0, atol=1e-5 * float(np.abs(want).max()))
    np.testing.assert_allclose(F.run_ort(to_onnx(opt), x), got, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    assert note.split(":")[0] not in compile(doc, device=strict_gpu).describe()


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("act", ["Clip", "Relu+Where", "Relu", "Sigmoid"])
def test_gemm_epilogue_runs_the_bias_and_activation_with_the_product(act, trans_b, strict_gpu, monkeypatch):
    """A Dense layer's Gemm (its bias moved to the chain after it, B constant, either
    layout) takes the bias back as its C and the ReLU/ReLU6 as its epilogue: the product a
    block of rows at a time with both on each block (cpu.product_epilogue, blocks of 256
    rows here: 700 rows, a last block cut short); a Sigmoid moves nowhere; a Gemm whose
    value another step reads too keeps its chain. The numbers: as written, ONNX Runtime,
    the optimised program exported to ONNX, and the kernels turned off after the program
    was made (NumPy's forms)."""
    from gpu_mdf.engine.onnx_export import to_onnx
    from gpu_mdf.engine.ops import cpu
    if not cpu.available():
        pytest.skip(f"compiled CPU kernels off here: {cpu.describe()}")
    monkeypatch.setattr(cpu, "CONV_BLOCK_BYTES", 256 * 24 * 4)
    ran, real = [], cpu.product_epilogue
    monkeypatch.setattr(cpu, "product_epilogue", lambda *a: ran.append(a[0].shape) or real(*a))

    def build(b):
        w = F.w(24, 40) if trans_b else F.w(40, 24)
        y = b.op("Gemm", ["x", b.init("w", w), b.init("b", F.w(24))], transB=trans_b)
        return _activation(b, y, act)
    model, doc = _onnx(build, (700, 40))
    x = (F.R.standard_normal((700, 40)) * 4).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    fires = act != "Sigmoid"
    assert ("gemm_epilogue: 1 Gemms" in opt.describe()) == fires
    assert sum(isinstance(st, FusedStep) for st in opt.plan.steps) == (not fires)
    assert ran == ([(700, 40)] if fires else [])
    _close(got, want)
    if act in ("Clip", "Relu+Where"):
        assert (want == 6).any() and (want == 0).any()
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, F.run_ort(model, x), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(F.run_ort(to_onnx(opt), x), got, rtol=0, atol=1e-5 * scale)
    monkeypatch.setenv("GPU_MDF_NUMBA", "0")
    np.testing.assert_allclose(opt.run(x), got, rtol=0, atol=1e-5 * scale)
    monkeypatch.delenv("GPU_MDF_NUMBA")
    assert "gemm_epilogue" not in compile(doc, device=strict_gpu).describe()

    def read_twice(b):
        y = b.op("Gemm", ["x", b.init("w", F.w(40, 24)), b.init("b", F.w(24))])
        return b.op("Add", [_activation(b, y, act), y])
    assert "gemm_epilogue" not in compile(_onnx(read_twice, (700, 40))[1], device="cpu").describe()


@pytest.mark.parametrize("case", ["relu6-stride1", "clip-stride2", "relu-dilated-12ch", "read-twice", "no-act",
                                  "depthwise-output", "residual", "residual-input-first", "add-of-another",
                                  "residual-projection-output", "no-expansion", "no-expansion-no-projection"])
def test_expand_depthwise_runs_an_inverted_residual_an_image_at_a_time(case, strict_gpu, monkeypatch):
    """A 1x1 expansion with its ReLU6, the depthwise conv reading it alone and the 1x1
    projection after that become one step (strides, pads, dilations; a depthwise conv of
    few channels runs by rows), and the residual connection's Add of the block's input
    after the projection's bias (either operand first) too; an expansion whose value is
    also an output, or without an activation, stays apart; a depthwise conv whose value is
    an output keeps its projection apart, a projection whose value is an output (or added
    to another value) its Add; a depthwise conv with no expansion before it runs with its
    projection (not without one). Blocks on two threads give the bits of one thread.
    The numbers: as written, ONNX Runtime, the optimised program exported to ONNX, and the
    kernels turned off after the program was made (the two convs, as written)."""
    from gpu_mdf.engine.onnx_export import to_onnx
    from gpu_mdf.engine.ops import cpu
    from gpu_mdf.engine.steps import ExpandDepthwiseStep
    if not cpu.products_available():
        pytest.skip(f"compiled CPU kernels or SciPy's BLAS off here: {cpu.describe()}")
    cm = {"relu-dilated-12ch": 12, "no-expansion": 8, "no-expansion-no-projection": 8}.get(case, 24)
    dw_attrs = {"relu6-stride1": dict(pads=[1, 1, 1, 1]), "clip-stride2": dict(pads=[0, 0, 1, 1], strides=[2, 2]),
                "relu-dilated-12ch": dict(pads=[2, 2, 2, 2], dilations=[2, 2])}.get(case, dict(pads=[1, 1, 1, 1]))

    def build(b):
        kind = {"clip-stride2": "Clip", "relu-dilated-12ch": "Relu"}.get(case, "Relu+Where")
        e = b.op("Conv", ["x", b.init("we", F.w(cm, 8, 1, 1)), b.init("be", F.w(cm))]) \
            if not case.startswith("no-expansion") else "x"
        if case not in ("no-act", "no-expansion", "no-expansion-no-projection"):
            e = _activation(b, e, kind)
        d = b.op("Conv", [e, b.init("wd", F.w(cm, 1, 3, 3)), b.init("bd", F.w(cm))], group=cm, **dw_attrs)
        d = _activation(b, d, kind)
        if case == "no-expansion-no-projection":
            return d
        y = b.op("Conv", [d, b.init("wp", F.w(8, cm, 1, 1)), b.init("bp", F.w(8))])
        if case in ("residual", "residual-projection-output"):
            return b.op("Add", [y, "x"]) if case == "residual" else [b.op("Add", [y, "x"]), y]
        if case == "residual-input-first":
            return b.op("Add", ["x", y])
        if case == "add-of-another":
            return b.op("Add", [y, b.op("Relu", ["x"])])
        return [y, e] if case == "read-twice" else [y, d] if case == "depthwise-output" else y
    shape = (3, 8, 9, 11)
    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    bld = F.Builder()
    outs = build(bld)
    model = bld.model("x", list(shape), outs if isinstance(outs, list) else [outs], opset=17)
    doc = onnx_to_mdf_doc(model)
    x = (F.R.standard_normal(shape) * 3).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    alone = case in ("read-twice", "no-act", "no-expansion")        # a depthwise conv and its projection
    fires = case not in ("read-twice", "no-act", "no-expansion", "no-expansion-no-projection")
    projected = int(case != "depthwise-output")
    residual = int(case in ("residual", "residual-input-first"))
    assert (f"expand_depthwise: 1 expansions and the depthwise convolutions after them ({projected} with the "
            f"projection after that, {residual} with the residual" in opt.describe()) == fires
    assert ("expand_depthwise: 0 expansions and the depthwise convolutions after them (0 with the projection after "
            "that, 0 with the residual connection's Add) run an image at a time; 1 depthwise convolutions with no "
            "expansion, and their projections, too" in opt.describe()) == alone
    assert sum(isinstance(st, ExpandDepthwiseStep) for st in opt.plan.steps) == fires + alone
    ort = F.run_ort(model, x)
    for g, w in zip(*(([v[n] for n in sorted(v)] if isinstance(v, dict) else [v]) for v in (got, want))):
        _close(g, w)
    if (fires or alone) and case not in ("depthwise-output", "residual-projection-output", "read-twice"):
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, ort, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(F.run_ort(to_onnx(opt), x), got, rtol=0, atol=1e-5 * scale)
        monkeypatch.setenv("GPU_MDF_NUMBA", "0")                # after compile: the two convs as written
        np.testing.assert_allclose(opt.run(x), got, rtol=0, atol=1e-5 * scale)
        monkeypatch.delenv("GPU_MDF_NUMBA")
        from gpu_mdf.engine.program import Program
        monkeypatch.setattr(Program, "block_size", property(lambda self: 2))    # 7 items: four blocks
        many = np.concatenate([x, x, x[:1]])
        np.testing.assert_array_equal(opt.run(many, threads=2), opt.run(many, threads=1))
        np.testing.assert_allclose(opt.run(many, threads=2)[3:6], got, rtol=0, atol=1e-5 * scale)
    assert "expand_depthwise" not in compile(doc, device=strict_gpu).describe()
    monkeypatch.setattr(cpu, "products_available", lambda: False)     # no SciPy: two steps
    assert "expand_depthwise" not in compile(doc, device="cpu").describe()


@pytest.mark.parametrize("form", ["epilogue", "chain"])
def test_a_clip_whose_min_exceeds_its_max_gives_the_max_as_onnxruntime(form, strict_gpu):
    """min(max(x, lo), hi): hi everywhere when lo > hi, in a depthwise kernel's epilogue, a
    fused chain on the CPU, and as generated C on the stand-in."""
    def build(b):
        y = b.op("Conv", ["x", b.init("w", F.w(4, 1, 3, 3)), b.init("b", F.w(4))], group=4, pads=[1, 1, 1, 1])
        if form == "chain":
            y = b.op("Mul", [b.op("Relu", [y]), b.init("k", np.float32(3))])
        return b.op("Clip", [y, b.init("lo", np.float32(0.5)), b.init("hi", np.float32(-0.25))])
    model, doc = _onnx(build, (2, 4, 6, 6))
    x = F.R.standard_normal((2, 4, 6, 6)).astype(np.float32)
    want = F.run_ort(model, x)
    assert np.all(want == np.float32(-0.25))
    for device in ("cpu", strict_gpu):
        prog = compile(doc, device=device)
        np.testing.assert_array_equal(np.asarray(prog.run(x)), want)
    assert ("depthwise_epilogue: 1" in compile(doc, device="cpu").describe()) == (form == "epilogue")


def test_winograd_for_wide_3x3_convs_on_the_cpu_only(monkeypatch, strict_gpu):
    from gpu_mdf.engine import passes
    from gpu_mdf.engine.ops import cpu
    if not cpu.available():
        pytest.skip(f"compiled CPU kernels off here: {cpu.describe()}")
    monkeypatch.setattr(cpu, "WINOGRAD_MIN_TILES", 0)        # a batch of 2 9x10 images: 50 tiles
    ran, call = [], cpu._call
    monkeypatch.setattr(cpu, "_call", lambda kernel, *a: ran.append(kernel) or call(kernel, *a))
    c = passes.WINOGRAD_MIN_IN

    def build(b):
        y = b.op("Conv", ["x", b.init("w1", F.w(64, c, 3, 3, scale=0.05)), b.init("b1", F.w(64))], pads=[1, 1, 1, 1])
        y = b.op("Relu", [y])
        y = b.op("Conv", [y, b.init("w2", F.w(c, 64, 3, 3, scale=0.1))], pads=[0, 1, 1, 0])      # too few inputs
        return b.op("Conv", [y, b.init("w3", F.w(64, c, 3, 3, scale=0.05))], strides=[2, 2])   # a stride of 2
    model, doc = _onnx(build, (2, c, 9, 10))
    x = F.R.standard_normal((2, c, 9, 10)).astype(np.float32)
    plain, opt, want, got = _both(doc, x)
    chosen = [st.what for st in opt.plan.steps if isinstance(st, OpStep) and st.tuning.get("winograd")]
    assert len(chosen) == 1 and "Winograd" in chosen[0], chosen
    assert "winograd_convs: 1 3x3 convolutions run as Winograd F(2x2, 3x3)" in opt.describe()
    assert ran.count("winograd tiles") == 1
    _close(got, want)
    np.testing.assert_allclose(got, F.run_ort(model, x), rtol=0, atol=1e-5 * float(np.abs(want).max()))
    from gpu_mdf.engine.onnx_export import to_onnx
    exported = to_onnx(opt)             # the choice of algorithm is not the op's: a plain Conv
    assert [n.op_type for n in exported.graph.node].count("Conv") == 3
    assert not any(a.name == "winograd" for n in exported.graph.node for a in n.attribute)
    np.testing.assert_allclose(F.run_ort(exported, x), got, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    on_gpu = compile(doc, device=strict_gpu)
    assert "winograd" not in on_gpu.describe() and not any(getattr(st, "tuning", None) for st in on_gpu.plan.steps)
    monkeypatch.setenv("GPU_MDF_NUMBA", "0")
    assert "winograd" not in compile(doc, device="cpu").describe()


def test_optimize_false_runs_the_graph_as_written(reference_mdf):
    plain = compile(reference_mdf, device="cpu", optimize=False)
    opt = compile(reference_mdf, device="cpu")
    assert not plain.plan.notes and "optimised:" not in plain.describe()
    assert opt.plan.notes and "optimised:" in opt.describe()
    assert not any(isinstance(st, FusedStep) for st in plain.plan.steps)


def test_an_optimised_program_exports_to_onnx_that_onnxruntime_agrees_with():
    import onnxruntime as ort

    from gpu_mdf.engine.onnx_export import to_onnx
    def build(b):
        y = b.op("Conv", ["x", b.init("w", F.w(4, 3, 3, 3)), b.init("b", F.w(4))], pads=[1, 1, 1, 1])
        y = b.op("Clip", [y, b.init("lo", np.float32(-0.5)), b.init("hi", np.float32(0.7))])
        return b.op("Softmax", [b.op("Flatten", [y], axis=1)], axis=-1)
    model, doc = _onnx(build, (2, 3, 6, 6))
    x = F.R.standard_normal((2, 3, 6, 6)).astype(np.float32)
    opt = compile(doc, device="cpu")
    assert any(isinstance(st, FusedStep) for st in opt.plan.steps)
    sess = ort.InferenceSession(to_onnx(opt).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x})[0], opt.run(x), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- #
# The fused forms: NumPy and the generated C agree, special values included
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", sorted(FUSIBLE))
def test_fused_op_numpy_and_generated_c_agree_on_special_values(op, dtype, strict_gpu):
    from gpu_mdf.engine.ops.fusion import run_numpy
    program, operands = fused_special.case(op, dtype)
    with np.errstate(all="ignore"):
        want = run_numpy(program, operands)
        got = cuda.fused(fake_cupy, program, dtype)(*[fake_cupy.asarray(o) for o in operands]).get()
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == "float32" else 1e-12, atol=0)


def test_generated_kernels_check_their_arguments(strict_gpu):
    program = (Instr("onnx::Add", 0, 1), Instr("onnx::Relu", "r0"))
    k = cuda.fused(fake_cupy, program, "float32")
    a32, a64 = fake_cupy.asarray(np.ones(3, np.float32)), fake_cupy.asarray(np.ones(3, np.float64))
    with pytest.raises(TypeError, match="Type is mismatched"):
        k(a32, a64)
    with pytest.raises(TypeError, match="Wrong number of arguments"):
        k(a32)
    with pytest.raises(TypeError, match="host array"):
        k(a32, np.ones(3, np.float32))
    np.testing.assert_array_equal(k(a32, fake_cupy.asarray(-np.full((2, 3), 2, np.float32))).get(), np.zeros((2, 3)))


def test_row_softmax_kernel_matches_numpy(strict_gpu):
    from gpu_mdf.engine.ops.nn import log_softmax, softmax
    x = F.R.standard_normal((6, 9)).astype(np.float32) * 5
    x[1, 2], x[2, :], x[3, 4] = np.nan, -np.inf, np.inf
    bias = F.R.standard_normal(9).astype(np.float32)
    program = (Instr("onnx::Add", 0, 1),)
    for tail, ref in (("softmax", softmax), ("logsoftmax", log_softmax)):
        out = fake_cupy.empty((6, 9), np.float32)
        cuda.row_softmax(fake_cupy, program, ("full", "row"), tail,
                         [fake_cupy.asarray(x), fake_cupy.asarray(bias)], out)
        with np.errstate(all="ignore"):
            want = ref(np, x + bias, -1)
        np.testing.assert_array_equal(np.isnan(out.get()), np.isnan(want))
        np.testing.assert_allclose(out.get(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride,dil,pads,group,mult", [
    (1, 1, (1, 1, 1, 1), 1, 1), (2, 1, (0, 1, 1, 0), 1, 1), (1, 2, (2, 2, 2, 2), 1, 1),
    (1, 1, (1, 1, 1, 1), 4, 1), (2, 1, (1, 0, 0, 1), 4, 2), (1, 2, (0, 0, 0, 0), 4, 3)])
def test_generated_convolutions_match_onnxruntime(stride, dil, pads, group, mult, strict_gpu):
    c, f = 4, 4 * mult if group > 1 else 5
    def build(b):
        return b.op("Conv", ["x", b.init("w", F.w(f, c // group, 3, 3)), b.init("b", F.w(f))],
                    strides=[stride, stride], dilations=[dil, dil], pads=list(pads), group=group)
    model, doc = _onnx(build, (2, c, 9, 8))
    x = F.R.standard_normal((2, c, 9, 8)).astype(np.float32)
    prog = compile(doc, device=strict_gpu)
    fake_cupy.COUNT.reset()
    got = prog.run(x)
    kinds = [w for k, w in fake_cupy.COUNT.log if k == "launch"]
    assert any(("depthwise" if group > 1 else "im2col") in k for k in kinds), kinds
    np.testing.assert_allclose(got, F.run_ort(model, x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# Launches and allocations per batch on the stand-in
# --------------------------------------------------------------------------- #
def _launches(prog, x):
    prog.run(x)
    prog.run(x)
    fake_cupy.COUNT.reset()
    prog.run(x)
    return fake_cupy.COUNT.launches, fake_cupy.COUNT.new_bytes


def _keras_mdf(model, **kw):
    from gpu_mdf.convert import keras_to_mdf
    return keras_to_mdf(model, **kw)


def test_reference_mlp_launches_and_allocations(strict_gpu, keras_cases):
    from gpu_mdf.config import reference_config
    from gpu_mdf.train import build_model
    keras_cases.keras.utils.set_random_seed(0)
    model = keras_cases.randomise(build_model(reference_config()))
    doc = _keras_mdf(model, normalize="l2")
    x = keras_cases.R.random((64, 28, 28)).astype(np.float32)
    plain, opt = compile(doc, device=strict_gpu, optimize=False), compile(doc, device=strict_gpu)
    (n_plain, _), (n_opt, new) = _launches(plain, x), _launches(opt, x)
    assert n_opt <= 6 < n_plain, (n_opt, n_plain)
    assert new == 0
    np.testing.assert_allclose(opt.run(x), compile(doc, device="cpu", optimize=False).run(x), rtol=1e-5, atol=1e-6)


def test_cnn_config_launches_and_allocations(strict_gpu, keras_cases):
    from gpu_mdf.config import load_config
    from gpu_mdf.train import build_model
    keras_cases.keras.utils.set_random_seed(0)
    model = keras_cases.randomise(build_model(load_config(Path(__file__).parent.parent / "configs/mnist_cnn.yaml")))
    doc = _keras_mdf(model, normalize="scale")
    x = keras_cases.R.random((16, 28, 28)).astype(np.float32)
    opt = compile(doc, device=strict_gpu)
    n, new = _launches(opt, x)
    assert n <= 2 * len(model.layers), (n, len(model.layers), fake_cupy.COUNT.log)
    assert new == 0
    # probabilities after logits of ~50: the GPU's other summation order moves them by ~3e-5
    got = opt.run(x)
    np.testing.assert_allclose(got, compile(doc, device="cpu", optimize=False).run(x), atol=1e-4)
    np.testing.assert_allclose(got, model.predict(x[..., None], verbose=0), atol=1e-4)


@pytest.mark.slow
def test_mobilenet_v2_launches_and_allocations(strict_gpu, keras_cases):
    keras = keras_cases.keras
    keras.utils.set_random_seed(0)
    model = keras_cases.randomise(keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                                                 weights=None, classes=10))
    doc = _keras_mdf(model)
    x = keras_cases.R.standard_normal((2, 32, 32, 3)).astype(np.float32)
    opt = compile(doc, device=strict_gpu)
    n, new = _launches(opt, x)
    assert n <= 2 * len(model.layers), (n, len(model.layers))
    assert new == 0
    np.testing.assert_allclose(opt.run(x), model.predict(x, verbose=0), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- #
# Every generated source compiles with nvcc
# --------------------------------------------------------------------------- #
_C_TYPES = {"T": "T", "int64": "long long", "int32": "int", "float32": "float", "float64": "double"}


def _cuda_unit(sources: dict, dtype: str) -> str:
    """The sources as CUDA kernels the way CuPy wraps them: one thread per index, non-raw
    parameters read and written at ``i``, raw ones indexed by a flat index."""
    parts = [f"typedef {dtype} T;\n"]
    for name, (ins, outs, body) in sources.items():
        params, pre, post = ["long long n_"], [], []
        for kind, text in (("in", ins), ("out", outs)):
            for p in text.split(","):
                words = p.split()
                raw = words[0] == "raw"
                t, v = words[-2], words[-1]
                ct = _C_TYPES[t]
                if raw:
                    params.append(f"{ct}* {v}")
                elif t in ("int64", "int32"):
                    params.append(f"{ct} {v}")
                else:
                    params.append(f"{ct}* {v}_p")
                    pre.append(f"const {ct} {v} = {v}_p[i];" if kind == "in" else f"{ct} {v};")
                    if kind == "out":
                        post.append(f"{v}_p[i] = {v};")
        parts.append(f'extern "C" __global__ void {name}({", ".join(params)}) {{\n'
                     "  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_; "
                     "i += (long long)blockDim.x * gridDim.x) {\n"
                     f"    {' '.join(pre)}\n    {{ {body} }}\n    {' '.join(post)}\n  }}\n}}\n")
    return "\n".join(parts)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("dtype", ["float", "double"])
def test_every_generated_source_compiles_to_ptx(dtype, strict_gpu, tmp_path, reference_mdf):
    np_dtype = "float32" if dtype == "float" else "float64"
    # the kernels real models make (fused chains, rows, convolutions), and one of every fused op
    compile(reference_mdf, device=strict_gpu).run(np.random.default_rng(0).random((2, 28, 28), np.float32))
    for op, f in FUSIBLE.items():
        cuda.fused(fake_cupy, (Instr(op, 0, 1 if f.arity == 2 else None, fused_special.ATTRS.get(op, ())),), np_dtype)
    for tail in ("softmax", "logsoftmax"):
        cuda.kernel(fake_cupy, "row", *cuda.row_source((Instr("onnx::Relu", 0),), ("full",), tail, np_dtype))
    sources = dict(cuda.SOURCES)
    sources.update({"gpu_mdf_im2col": cuda.IM2COL, "gpu_mdf_depthwise": cuda.DEPTHWISE})
    # each source under the type it was written for (a float32 source names expf, a float64 one exp)
    names = ("exp", "tanh", "fabs", "sqrt", "log", "fmin", "fmax")
    alternatives = "|".join(names if dtype == "float" else (n + "f" for n in names))
    other = rf"\b({alternatives})\("
    sources = {k: v for k, v in sources.items() if not re.search(other, v[2])}
    src = tmp_path / "kernels.cu"
    src.write_text(_cuda_unit(sources, dtype))
    r = subprocess.run(["nvcc", "-ptx", "-arch=sm_90", "-Werror", "all-warnings", "-o", str(tmp_path / "k.ptx"),
                        str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + "\n" + src.read_text()
    ptx = (tmp_path / "k.ptx").read_text()
    assert all(f".entry {name}" in ptx for name in sources), json.dumps(sorted(sources))
