"""The compiled CPU kernels (gpu_mdf/engine/ops/cpu.py, numba) against oracles nobody here
wrote and against the NumPy forms they replace:

* depthwise and grouped/plain convolutions through them match ONNX Runtime on a class of
  shapes (strides, dilations, asymmetric and SAME pads, 1xK and 5x5 kernels, with and
  without bias, float32 and float64, every weight random and non-zero);
* im2col's columns are the NumPy form's, bit for bit; a kernel gives the same bits from
  any thread, several at once;
* max pooling through its kernel matches ONNX Runtime (pads, strides, dilations,
  ceil_mode, SAME) and the NumPy form (NaN and infinities included); a max or min over
  short axes (pooling written as reshape + reduce) is NumPy's own reduction, NaN included,
  and the kernel runs exactly where it applies;
* every fused op with a compiled form agrees with NumPy's on NaN, infinities and signed
  zeros, and a chain broadcasts and writes in place as NumPy's does; float32 chains' tanh,
  exp and sigmoid (``cpu.tanh32``, exp32, sigmoid32) are within 7, 1 and 2.5 ulp of
  float64's over millions of float32 values;
* every case of the golden corpus gives the same outputs with the kernels on and off
  (``GPU_MDF_NUMBA=0``), within 1e-5 x max|y|, NaN where NaN.

Skipped, saying so, where numba is not installed (the lowest-versions job runs without it,
so the NumPy forms are what it tests).
"""

import math
import threading

import fused_special
import mdf_fixtures as F
import numpy as np
import pytest
from golden_corpus import CASES, load

from gpu_mdf.engine import compile
from gpu_mdf.engine.ops import cpu, nn
from gpu_mdf.engine.ops.fusion import FUSIBLE, Instr, compiles, run_numpy

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"compiled CPU kernels off here: {cpu.describe()}")


@pytest.fixture
def numpy_forms(monkeypatch):
    """Run the NumPy forms (the kernels turned off) inside a ``with`` block."""
    import contextlib

    @contextlib.contextmanager
    def off():
        monkeypatch.setenv("GPU_MDF_NUMBA", "0")
        try:
            yield
        finally:
            monkeypatch.delenv("GPU_MDF_NUMBA")
    return off


def _ort_conv(x, w, b, **attrs):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper
    t = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.DOUBLE
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if b is not None else [])
    node = helper.make_node("Conv", ["x", "w"] + (["b"] if b is not None else []), ["y"], **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", t, x.shape)],
                          [helper.make_tensor_value_info("y", t, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


CONV_CASES = {
    # name: (N, C, H, W, F, kernel, group, attrs)
    "dw3x3": (2, 8, 9, 11, 8, (3, 3), 8, dict(pads=[1, 1, 1, 1])),
    "dw3x3-stride2": (2, 8, 9, 11, 8, (3, 3), 8, dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "dw5x5-stride2-asym": (1, 6, 13, 10, 6, (5, 5), 6, dict(strides=[2, 1], pads=[2, 1, 1, 2])),
    "dw3x3-dilated": (2, 5, 12, 12, 5, (3, 3), 5, dict(dilations=[2, 3], pads=[2, 3, 2, 3])),
    "dw1x3-same": (3, 4, 7, 8, 4, (1, 3), 4, dict(auto_pad="SAME_UPPER")),
    "dw3x3-valid": (1, 12, 6, 6, 12, (3, 3), 12, {}),
    "dw3x3-valid-c16": (1, 16, 6, 6, 16, (3, 3), 16, {}),                          # per-pixel kernel (C >= 16)
    "dw3x3-c24": (2, 24, 7, 9, 24, (3, 3), 24, dict(pads=[1, 0, 2, 1])),           # per-pixel kernel
    "dw5x5-c56": (1, 56, 9, 8, 56, (5, 5), 56, dict(pads=[2, 2, 2, 2])),           # per-pixel kernel (C > 48)
    "dw-multiplier2": (2, 4, 8, 8, 8, (3, 3), 4, dict(pads=[1, 1, 1, 1])),
    "dw5x5-multiplier3-asym": (2, 5, 11, 9, 15, (5, 5), 5, dict(strides=[2, 1], pads=[2, 0, 1, 3])),
    "dw3x3-multiplier2-dilated": (1, 3, 10, 12, 6, (3, 3), 3, dict(dilations=[2, 2], pads=[2, 2, 2, 2])),
    "dw3x3-multiplier2-stride1x2": (2, 4, 8, 9, 8, (3, 3), 4, dict(strides=[1, 2], pads=[1, 1, 1, 1])),  # NumPy form
    "conv3x3-c3": (2, 3, 15, 14, 7, (3, 3), 1, dict(pads=[1, 1, 1, 1])),                           # by images
    "conv7x7-stride2-stem": (1, 3, 32, 32, 8, (7, 7), 1, dict(strides=[2, 2], pads=[3, 3, 3, 3])),  # by images
    "conv3x3-c3-stride2-stem": (3, 3, 17, 16, 16, (3, 3), 1, dict(strides=[2, 2], pads=[0, 0, 1, 1])),
    "conv4x4-c3-patches": (2, 3, 16, 12, 9, (4, 4), 1, dict(strides=[4, 4])),
    "conv5x5-c2-asym": (2, 2, 13, 10, 3, (5, 5), 1, dict(strides=[1, 2], pads=[4, 0, 1, 3])),
    "conv3x3-c4-dilated-stride2x1": (2, 4, 14, 13, 5, (3, 3), 1, dict(dilations=[2, 2], strides=[2, 1],
                                                                      pads=[2, 1, 2, 1])),
    "conv3x3-c3-beyond-pads": (1, 3, 5, 4, 2, (3, 3), 1, dict(pads=[3, 3, 3, 3])),   # windows wholly outside x
    "conv3x3-dilated-asym": (2, 9, 12, 11, 5, (3, 3), 1, dict(dilations=[2, 1], pads=[0, 2, 3, 1], strides=[1, 2])),
    "conv1x1-c1": (2, 1, 6, 6, 4, (3, 3), 1, {}),                                  # planes (C = 1)
    "conv3x2-c2-dilated": (2, 2, 11, 9, 5, (3, 2), 1, dict(dilations=[2, 1], pads=[2, 0, 1, 1])),   # by images
    "conv3x3-c4-stride2": (3, 4, 12, 11, 6, (3, 3), 1, dict(strides=[2, 2], pads=[0, 0, 1, 1])),     # by images
    "conv3x3-c5": (2, 5, 9, 8, 4, (3, 3), 1, dict(pads=[1, 1, 1, 1])),                               # im2col
    "grouped3x3": (2, 8, 9, 9, 12, (3, 3), 4, dict(pads=[1, 1, 1, 1], strides=[2, 2])),
}


# depthwise cases run as whole rows (a horizontal stride of 1, few channels); the others per pixel
DEPTHWISE_ROWS = {"dw3x3", "dw5x5-stride2-asym", "dw3x3-dilated", "dw1x3-same", "dw3x3-valid", "dw-multiplier2",
                  "dw5x5-multiplier3-asym", "dw3x3-multiplier2-dilated"}


def _direct_kernels(c, k):
    """The compiled kernels a conv of ``c`` input channels (one group) and window ``k`` runs."""
    if 2 <= c <= nn.PLANES_UP_TO and cpu.products_available():
        return [f"conv images 3x3 {c}" if k == (3, 3) else "conv images"]     # columns an image at a time
    return [] if c == 1 or (c <= nn.PLANES_UP_TO and math.prod(k) <= 9) else ["im2col"]   # planes


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv_through_the_kernels_matches_onnxruntime(name, bias, dtype, numpy_forms, monkeypatch):
    n, c, h, w_, f, k, g, attrs = CONV_CASES[name]
    ran, call = [], cpu._call
    monkeypatch.setattr(cpu, "_call", lambda kernel, *a: ran.append(kernel) or call(kernel, *a))
    x = F.R.standard_normal((n, c, h, w_)).astype(dtype)
    w = (F.R.standard_normal((f, c // g) + k) + 0.1).astype(dtype)
    b = (F.R.standard_normal(f) + 0.1).astype(dtype) if bias else None
    # ONNX Runtime has no float64 Conv: float64 is checked against its float32 result at
    # float32's tolerance, and against the NumPy forms at float64's
    f32 = [None if a is None else a.astype(np.float32) for a in (x, w, b)]
    want = _ort_conv(*f32, group=g, **attrs)
    got = nn.conv(np, x, w, b, group=g, **attrs)
    with numpy_forms():
        plain = nn.conv(np, x, w, b, group=g, **attrs)
    if name in DEPTHWISE_ROWS:
        expected = ["depthwise rows"]
    elif c == g and g > 1:
        expected = ["depthwise"] if f == g else []        # a multiplier with a horizontal stride: NumPy's form
    else:
        expected = _direct_kernels(c, k)
    assert ran == expected, ran
    scale = float(np.abs(want).max())
    assert got.shape == want.shape and got.dtype == x.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(got, plain, rtol=0, atol=(1e-5 if dtype == "float32" else 1e-12) * scale)


WINOGRAD_CASES = {
    # name: (N, C, H, W, F, attrs): odd and even output sizes (a last tile cut), pads on one
    # side, SAME and VALID, an output of one pixel, the channel counts the pass picks
    "pads1-even": (2, 5, 8, 10, 4, dict(pads=[1, 1, 1, 1])),
    "pads1-odd": (1, 3, 7, 9, 6, dict(pads=[1, 1, 1, 1])),
    "valid-odd-even": (2, 4, 9, 6, 3, {}),
    "asymmetric": (1, 6, 8, 7, 5, dict(pads=[0, 2, 3, 1])),
    "same-upper": (2, 3, 6, 5, 4, dict(auto_pad="SAME_UPPER")),
    "same-lower": (1, 4, 5, 8, 2, dict(auto_pad="SAME_LOWER")),
    "one-pixel": (3, 2, 3, 3, 2, {}),
    "wide": (2, 130, 6, 7, 70, dict(pads=[1, 1, 1, 1])),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", sorted(WINOGRAD_CASES))
def test_winograd_conv_matches_onnxruntime(name, bias, dtype, monkeypatch):
    n, c, h, w_, f, attrs = WINOGRAD_CASES[name]
    monkeypatch.setattr(cpu, "WINOGRAD_MIN_TILES", 0)        # these batches are smaller
    ran, call = [], cpu._call
    monkeypatch.setattr(cpu, "_call", lambda kernel, *a: ran.append(kernel) or call(kernel, *a))
    x = F.R.standard_normal((n, c, h, w_)).astype(dtype)
    w = (F.R.standard_normal((f, c, 3, 3)) / np.sqrt(9 * c) + 0.05).astype(dtype)
    b = (F.R.standard_normal(f) + 0.1).astype(dtype) if bias else None
    want = _ort_conv(*[None if a is None else a.astype(np.float32) for a in (x, w, b)], **attrs)
    got = nn.conv(np, x, w, b, winograd=True, **attrs)
    direct = nn.conv(np, x, w, b, **attrs)
    assert ran == ["winograd tiles", "winograd untiles"] + _direct_kernels(c, (3, 3)), ran
    scale = float(np.abs(want).max())
    assert got.shape == want.shape and got.dtype == x.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(got, direct, rtol=0, atol=(1e-5 if dtype == "float32" else 1e-12) * scale)


@pytest.mark.parametrize("attrs", [dict(strides=[2, 2], pads=[1, 1, 1, 1]), dict(dilations=[2, 1]), dict(group=2),
                                   dict(kernel=(5, 5)), dict(kernel=(1, 3))])
def test_winograd_is_asked_only_of_3x3_stride_1_one_group(attrs, monkeypatch):
    """Any other geometry runs its usual form, the same bits as without the request."""
    monkeypatch.setattr(cpu, "WINOGRAD_MIN_TILES", 0)
    ran, call = [], cpu._call
    monkeypatch.setattr(cpu, "_call", lambda kernel, *a: ran.append(kernel) or call(kernel, *a))
    attrs = dict(attrs)
    kernel, g = attrs.pop("kernel", (3, 3)), attrs.get("group", 1)
    x = F.R.standard_normal((2, 4, 9, 8)).astype(np.float32)
    w = F.w(6, 4 // g, *kernel)
    for b in (F.w(6), None):
        np.testing.assert_array_equal(nn.conv(np, x, w, b, winograd=True, **attrs), nn.conv(np, x, w, b, **attrs))
    assert not any(k.startswith("winograd") for k in ran), ran


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("c, k, f, attrs", [(3, (3, 3), 7, dict(pads=[1, 1, 1, 1])),
                                            (3, (3, 3), 1, dict(strides=[2, 2], pads=[0, 0, 1, 1])),
                                            (2, (3, 2), 4, dict(dilations=[2, 1], pads=[2, 0, 1, 1])),
                                            (4, (1, 3), 5, {}), (4, (3, 3), 2, dict(pads=[1, 1, 1, 1]))])
def test_planes_are_the_columns_through_a_transposed_view(c, k, f, attrs, dtype, monkeypatch):
    """A conv of 2-4 channels where its columns are not written an image at a time (no
    SciPy) reads them as planes, one per window offset and channel: the same products as
    the columns to rounding (OpenBLAS picks another kernel for a transposed operand in some
    shapes: one filter, a few filters over 36 offsets)."""
    monkeypatch.setattr(cpu, "products_available", lambda: False)
    x = F.R.standard_normal((3, c, 13, 12)).astype(dtype)
    w, b = F.w(f, c, *k).astype(dtype), F.w(f).astype(dtype)
    took, planes = [], nn._planes
    monkeypatch.setattr(nn, "_planes", lambda *a: took.append(1) or planes(*a))
    got = nn.conv(np, x, w, b, **attrs)
    assert took
    monkeypatch.setattr(nn, "PLANES_UP_TO", 0)                 # the columns (C > 1)
    nn._RUNNERS.clear()                                        # chosen again
    want = nn.conv(np, x, w, b, **attrs)
    assert len(took) == 1
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=(1e-6 if dtype == "float32" else 1e-14) * scale)


BLOCK_CASES = {
    # name: (N, C, H, W, F, kernel, attrs, output rows a block): blocks of one row, blocks
    # that straddle the padding above and below, a last block cut short, strides,
    # dilations and asymmetric pads (a block's input rows begin inside the top padding)
    "3x3-pads1-rows1": (2, 8, 13, 11, 5, (3, 3), dict(pads=[1, 1, 1, 1]), 1),
    "5x3-stride2x1-asym": (1, 9, 17, 12, 7, (5, 3), dict(strides=[2, 1], pads=[2, 0, 1, 1]), 3),
    "3x3-valid-rows4": (2, 16, 14, 14, 32, (3, 3), {}, 4),
    "3x3-dilated-asym": (1, 8, 12, 11, 4, (3, 3), dict(dilations=[2, 3], pads=[3, 1, 0, 2]), 2),
    "2x2-stride2x3": (3, 12, 9, 30, 6, (2, 2), dict(strides=[2, 3]), 3),
    "7x7-pads3-rows5": (1, 8, 20, 9, 3, (7, 7), dict(pads=[3, 3, 3, 3], strides=[1, 2]), 5),
    # whole images a block: two, and a last block of one
    "3x3-images2": (5, 8, 6, 7, 4, (3, 3), dict(pads=[1, 1, 1, 1]), 12),
    # pads wider than the window: blocks whose rows lie wholly in the padding (no input rows)
    "3x3-pads-past-the-window": (1, 8, 5, 6, 3, (3, 3), dict(pads=[6, 1, 7, 2], strides=[2, 1]), 1),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(BLOCK_CASES))
def test_conv_by_blocks_matches_onnxruntime_and_the_whole_columns(name, dtype, monkeypatch):
    """A conv whose columns are written and multiplied a block of output rows at a time
    gives the products of one GEMM over all its columns (to rounding: OpenBLAS picks its
    kernel by a product's size) and ONNX Runtime's conv."""
    n, c, h, w_, f, k, attrs, rows = BLOCK_CASES[name]
    x = F.R.standard_normal((n, c, h, w_)).astype(dtype)
    w = (F.R.standard_normal((f, c) + k) + 0.1).astype(dtype)
    b = (F.R.standard_normal(f) + 0.1).astype(dtype)
    monkeypatch.setattr(cpu, "conv_by_blocks", lambda *a: False)
    whole = nn.conv(np, x, w, b, **attrs)
    oh, ow = whole.shape[2:]
    ran, call = [], cpu._call
    monkeypatch.setattr(cpu, "_call", lambda kernel, *a: ran.append(kernel) or call(kernel, *a))
    monkeypatch.setattr(cpu, "conv_by_blocks", lambda *a: True)
    monkeypatch.setattr(cpu, "_CONV_BLOCK_ROWS", 1)
    monkeypatch.setattr(cpu, "CONV_BLOCK_BYTES", rows * ow * math.prod(k) * c * x.itemsize)
    nn._RUNNERS.clear()                                        # chosen again
    got = nn.conv(np, x, w, b, **attrs)
    blocks = -(-n // (rows // oh)) if rows >= oh else n * -(-oh // rows)
    assert ran == ["im2col"] * blocks, ran
    want = _ort_conv(*[a.astype(np.float32) for a in (x, w, b)], **attrs)
    scale = float(np.abs(want).max())
    assert got.shape == want.shape and got.dtype == x.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(got, whole, rtol=0, atol=(1e-6 if dtype == "float32" else 1e-14) * scale)


@pytest.mark.parametrize("n, c, hw, kernel, f, stride, blocks", [
    (3, 64, 56, 3, 64, 1, True),       # ResNet's first stage, in Program.run's blocks of 3 images
    (3, 32, 112, 3, 32, 1, True),
    (79, 16, 14, 3, 32, 1, False),     # MNIST's second conv, a block of 79 images: 6.5 MB stay in cache
    (3, 3, 224, 7, 64, 2, False),      # a 3-channel stem: its im2col is slow by its stores, not by memory
    (3, 512, 7, 3, 512, 1, False),     # 9.4 MB of weights, packed again for every block
    (2, 64, 8, 3, 64, 1, False),       # columns of under 4 blocks
])
def test_conv_runs_by_blocks_where_measured_to_pay(n, c, hw, kernel, f, stride, blocks):
    out = (hw + 2 * (kernel // 2) - kernel) // stride + 1
    assert cpu.conv_by_blocks(c, kernel * kernel, f, n * out * out, 4) is blocks


EPILOGUES = [(("onnx::Relu",),), (("onnx::Clip", 0.0, 6.0),), (("onnx::Relu",), ("gpu_mdf::CapAt", 6.0)),
             (("onnx::Clip", -np.inf, 0.5), ("onnx::Relu",))]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "+".join(op.split("::")[1] for op, *_ in e))
@pytest.mark.parametrize("c, mult, strides", [(8, 1, (1, 1)), (32, 1, (1, 1)), (24, 1, (2, 2)), (4, 2, (1, 1))])
def test_depthwise_epilogue_is_its_ops_after_the_kernel_bit_for_bit(c, mult, strides, epilogue, dtype, numpy_forms):
    """Inside the compiled kernel (by rows, or per pixel) the activations give the bits of
    their NumPy forms run after it, NaN and zeros' signs included; with the kernels off
    the NumPy forms run after the NumPy conv."""
    x = (F.R.standard_normal((2, c, 9, 10)) * 4).astype(dtype)
    x[0, 1, 3, 3], x[1, 0, 5, 6] = np.nan, -np.inf
    w, b = F.w(c * mult, 1, 3, 3).astype(dtype), F.w(c * mult).astype(dtype)
    attrs = dict(group=c, strides=list(strides), pads=[1, 1, 1, 1])
    got = nn.conv(np, x, w, b, epilogue=epilogue, **attrs)
    want = nn._activations(np, nn.conv(np, x, w, b, **attrs), epilogue)
    assert (want == 0).any()                                   # and NaN or infinities, but where capped
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    with numpy_forms():
        off = nn.conv(np, x, w, b, epilogue=epilogue, **attrs)
        np.testing.assert_array_equal(off, nn._activations(np, nn.conv(np, x, w, b, **attrs), epilogue))
    np.testing.assert_allclose(off, got, rtol=0, atol=1e-5 * float(np.abs(got[np.isfinite(got)]).max()))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "+".join(op.split("::")[1] for op, *_ in e))
@pytest.mark.parametrize("n, c, hw, f, block_bytes", [(3, 8, 20, 48, 4096), (2, 24, 9, 10, 1 << 20),
                                                       (1, 5, 7, 3, 64), (2, 16, 12, 1000, 8192)])
def test_a_1x1_conv_epilogue_by_blocks_is_the_product_then_its_ops(n, c, hw, f, block_bytes, epilogue, dtype,
                                                                   numpy_forms, monkeypatch):
    """A 1x1 conv with an epilogue runs its product, bias and activations a block of output
    rows at a time (cpu.product_epilogue): blocks of one row to all rows, a last block cut
    short, rows of the epilogue's loop holding several outputs (a bias tiled) or part of
    one (1,000 channels). The activations give their NumPy forms' bits on each product
    (NaN and infinities included); the products those of one GEMM to rounding; ONNX
    Runtime's conv and activation too."""
    monkeypatch.setattr(cpu, "CONV_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(cpu, "_CONV_BLOCK_ROWS", 1)
    ran, real = [], cpu.product_epilogue
    monkeypatch.setattr(cpu, "product_epilogue", lambda *a: ran.append(1) or real(*a))
    x = (F.R.standard_normal((n, c, hw, hw)) * 4).astype(dtype)
    x[0, 1, 3, 3], x[-1, 0, 5, 6] = np.nan, -np.inf
    w, b = F.w(f, c, 1, 1).astype(dtype), F.w(f).astype(dtype)
    got = nn.conv(np, x, w, b, epilogue=epilogue)
    assert ran == [1]
    assert got.shape == (n, f, hw, hw) and got.dtype == x.dtype
    want = nn._activations(np, nn.conv(np, x, w, b), epilogue)
    finite = np.isfinite(want)
    assert (want == 0).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[finite], want[finite], rtol=0,
                               atol=(1e-5 if dtype == "float32" else 1e-12) * float(np.abs(want[finite]).max()))
    with numpy_forms():
        off = nn.conv(np, x, w, b, epilogue=epilogue)
    np.testing.assert_array_equal(np.isnan(off), np.isnan(got))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("project", ["none", "bias", "no bias"])
@pytest.mark.parametrize("cm, h, w_, strides, dil, pads", [
    (48, 9, 11, (1, 1), (1, 1), (1, 1, 1, 1)),          # per pixel
    (24, 10, 7, (2, 2), (1, 1), (0, 0, 1, 1)),          # a stride: per pixel
    (8, 6, 9, (1, 1), (2, 1), (2, 1, 2, 1)),             # few channels: by rows, dilated
    (1000, 3, 3, (1, 1), (1, 1), (1, 1, 1, 1)),         # a row of the epilogue's loop: part of one pixel
])
def test_expand_depthwise_is_the_convs_apart(cm, h, w_, strides, dil, pads, project, dtype, monkeypatch):
    """cpu.expand_depthwise_fn (an image at a time, the expansion in a buffer of one image,
    the depthwise conv's image in another where a projection follows) gives the values of
    its convs run apart (the 1x1 conv's product by blocks, bias and activations, the
    depthwise kernel, the projection's product and bias): the products to rounding (SciPy's
    BLAS an image at a time against NumPy's on every image: another kernel may take a
    product's last rows), NaN and infinities where they are; rows of the epilogue's loop
    straddling pixels, or a pixel's channels split over rows."""
    if not cpu.products_available():
        pytest.skip(f"compiled CPU kernels or SciPy off here: {cpu.describe()}")
    epi = (("onnx::Relu",), ("gpu_mdf::CapAt", 6.0))
    r = np.random.default_rng([cm, h, w_, len(project)])          # the same values whatever ran before

    def w(*shape):
        return (r.standard_normal(shape) * 0.3).astype(dtype)
    x = (r.standard_normal((3, 5, h, w_)) * 12).astype(dtype)
    x[0, 1, 2, 2], x[2, 0, 1, w_ - 1] = np.nan, np.inf
    we, be, wd, bd, wp = w(cm, 5, 1, 1), w(cm), w(cm, 1, 3, 3), w(cm), w(7, cm, 1, 1)
    bp = w(7) if project == "bias" else None
    attrs = dict(group=cm, strides=list(strides), dilations=list(dil), pads=list(pads))
    apart = nn.conv(np, nn.conv(np, x, we, be, epilogue=epi), wd, bd, epilogue=epi, **attrs)
    assert (apart == 0).any() and (apart == 6).any()
    ran, call = [], cpu._call
    monkeypatch.setattr(cpu, "_call", lambda kernel, *a: ran.append(kernel) or call(kernel, *a))
    if project == "none":
        got = nn.expand_depthwise(np, x, we, be, wd, bd, epi, epi, {}, **attrs)
    else:
        apart = nn.conv(np, apart, wp, bp)
        got = nn.expand_depthwise(np, x, we, be, wd, bd, epi, epi, {}, **attrs, wp=wp, bp=bp, project_attrs={})
    assert got.shape == apart.shape and got.dtype == x.dtype and ran == ["expand depthwise"]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(apart))
    finite = np.isfinite(apart)
    np.testing.assert_array_equal(got[~finite & ~np.isnan(apart)], apart[~finite & ~np.isnan(apart)])
    np.testing.assert_allclose(got[finite], apart[finite], rtol=0,
                               atol=(1e-6 if dtype == "float32" else 1e-14) * float(np.abs(apart[finite]).max()))
    assert cpu.depthwise_by_rows(cm, cm, (3, 3), strides, got.shape[3]) == (cm < 16)


def test_winograd_only_for_a_batch_of_enough_tiles(monkeypatch):
    """Below cpu.WINOGRAD_MIN_TILES 4x4 tiles (2x2 outputs each) a batch runs im2col and
    one GEMM, the same bits as without the request; at that count, Winograd."""
    ran, call = [], cpu._call
    monkeypatch.setattr(cpu, "_call", lambda kernel, *a: ran.append(kernel) or call(kernel, *a))
    w, b = F.w(8, 3, 3, 3), F.w(8)
    per_item = 4 * 4                                       # 8x8 outputs
    few = F.R.standard_normal((cpu.WINOGRAD_MIN_TILES // per_item - 1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(nn.conv(np, few, w, b, winograd=True, pads=[1, 1, 1, 1]),
                                  nn.conv(np, few, w, b, pads=[1, 1, 1, 1]))
    assert not any(k.startswith("winograd") for k in ran), ran
    enough = F.R.standard_normal((-(-cpu.WINOGRAD_MIN_TILES // per_item), 3, 8, 8)).astype(np.float32)
    got = nn.conv(np, enough, w, b, winograd=True, pads=[1, 1, 1, 1])
    assert "winograd tiles" in ran
    want = nn.conv(np, enough, w, b, pads=[1, 1, 1, 1])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_winograd_puts_nan_and_infinity_where_the_direct_form_does(monkeypatch):
    """The transforms spread a non-finite value over its whole 4x4 tile (0 x inf is NaN):
    such a result is computed again by the direct form, which puts it only in the windows
    that hold it."""
    monkeypatch.setattr(cpu, "WINOGRAD_MIN_TILES", 0)
    x = F.R.standard_normal((1, 4, 8, 8)).astype(np.float32)
    x[0, 1, 2, 5] = np.inf
    x[0, 3, 6, 1] = np.nan
    w, b = F.w(5, 4, 3, 3) + 0.05, F.w(5)
    got = nn.conv(np, x, w, b, winograd=True, pads=[1, 1, 1, 1])
    want = nn.conv(np, x, w, b, pads=[1, 1, 1, 1])
    assert np.isfinite(want).sum() > 0 and not np.isfinite(want).all()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("c", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("geometry", [((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), ((5, 3), (2, 1), (1, 2), (2, 0, 1, 3)),
                                      ((1, 1), (2, 2), (1, 1), (0, 0, 0, 0))])
def test_im2col_is_the_numpy_form_bit_for_bit(c, geometry):
    kernel, strides, dil, pads = geometry
    x = F.R.standard_normal((2, c, 10, 9)).astype(np.float32)
    out, _ = nn._out_sizes(x.shape[2:], kernel, strides, dil, list(pads))
    got = nn._columns(np, x, kernel, strides, dil, list(pads), out, True)
    want = nn._columns(np, x, kernel, strides, dil, list(pads), out, False)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("c, width", [(37, 10), (16, 10), (48, 7), (3, 10), (16, 2)])
@pytest.mark.parametrize("strides, dil", [((1, 1), (1, 1)), ((2, 2), (1, 1)), ((1, 2), (2, 1))])
def test_depthwise_3x3_inside_windows_add_the_terms_of_the_general_loop(strides, dil, c, width):
    """The depthwise kernel's 3x3 windows inside the input run as one expression, the others
    (here: every window, the input zero-padded beforehand) as the general loop: the same
    sums, bit for bit (a zero term changes nothing but the sign of a zero), whole vectors
    of channels or not, and rows with no inner window (width 2) too."""
    x = F.R.standard_normal((2, 9, width, c)).astype(np.float32)
    w = F.R.standard_normal((c, 1, 3, 3)).astype(np.float32)
    b = F.R.standard_normal(c).astype(np.float32)
    pads = (dil[0], dil[1], dil[0], dil[1])
    out, _ = nn._out_sizes(x.shape[1:3], (3, 3), strides, dil, list(pads))
    implicit = cpu.depthwise(x, w, b, (3, 3), strides, dil, pads, out)            # border windows: the loop
    xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))
    explicit = cpu.depthwise(xp, w, b, (3, 3), strides, dil, (0, 0, 0, 0), out)  # every window inside
    border = np.ones(out, bool)
    border[1:-1, 1:-1] = False
    assert border.any() and ((~border).any() or width == 2)
    np.testing.assert_array_equal(implicit, explicit)


DEPTHWISE_GEOMETRIES = [
    # (C, H, W, kernel, vertical stride, dilations, pads (top, left, bottom, right))
    (8, 9, 11, (3, 3), 1, (1, 1), (1, 1, 1, 1)),
    (16, 6, 5, (3, 3), 2, (1, 1), (1, 1, 1, 1)),
    (1, 7, 7, (5, 5), 1, (1, 1), (2, 2, 2, 2)),
    (3, 8, 6, (5, 5), 1, (2, 1), (3, 1, 0, 4)),
    (32, 5, 9, (1, 3), 3, (1, 2), (0, 2, 0, 2)),
    (5, 6, 3, (7, 7), 1, (1, 1), (3, 5, 3, 5)),       # windows wholly in the padding: the bias alone
    (12, 4, 4, (3, 1), 1, (1, 1), (0, 0, 0, 0)),
    (7, 10, 10, (3, 3), 1, (3, 2), (3, 2, 3, 2)),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("geometry", DEPTHWISE_GEOMETRIES)
def test_depthwise_by_rows_is_the_per_pixel_kernel_bit_for_bit(geometry, dtype):
    """The rows form adds the same terms in the same order as the per-pixel kernel (its 3x3
    one-expression windows and its loop): the same bits, borders, dilations and windows
    lying wholly in the padding included."""
    c, h, w_, kernel, sh, dil, pads = geometry
    x = F.R.standard_normal((2, h, w_, c)).astype(dtype)
    w = F.R.standard_normal((c, 1) + kernel).astype(dtype)
    b = F.R.standard_normal(c).astype(dtype)
    out, _ = nn._out_sizes((h, w_), kernel, (sh, 1), dil, list(pads))
    assert min(out) > 0
    wk = np.ascontiguousarray(w.reshape(c, -1).T).reshape(kernel + (c,))
    none = cpu.epilogue_codes((), dtype)
    per_pixel = cpu._call("depthwise", x, wk, b, np.empty((2,) + tuple(out) + (c,), dtype), sh, 1, *dil, *pads[:2],
                          none)
    wt = np.tile(wk, (1, 1, out[1]))
    rows = cpu._call("depthwise rows", x, wt, b, np.full((2,) + tuple(out) + (c,), np.nan, dtype), sh, *dil,
                     *pads[:2], none)
    np.testing.assert_array_equal(rows, per_pixel)
    assert cpu.depthwise_by_rows(c, c, kernel, (sh, 1), out[1]) == (c < (16 if kernel == (3, 3) else 49))
    assert not cpu.depthwise_by_rows(c, c, kernel, (sh, 2), out[1])           # a horizontal stride: per pixel
    assert not cpu.depthwise_by_rows(c, c, kernel, (sh, 1), cpu._ROW_RUN // c + 1)   # a row past the weights' tile
    assert not cpu.depthwise_by_rows(c, c, (8, 7), (sh, 1), 4)     # over 49 offsets: the tile would be large


def _ort_node(op_type, x, **attrs):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper
    t = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.DOUBLE
    node = helper.make_node(op_type, ["x"], ["y"], **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", t, x.shape)],
                          [helper.make_tensor_value_info("y", t, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.mark.parametrize("layout", ["NCHW", "channels-last", "strided", "3-D", "1-D"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_global_average_pool_as_a_product_with_ones_matches_onnx_runtime(layout, dtype):
    """GlobalAveragePool on the CPU sums through BLAS (a product with ones) for NCHW and
    channels-last memory, NumPy's mean otherwise: ONNX Runtime's values (NumPy's mean in
    float64, which ONNX Runtime does not take), NaN and infinities in the channels that hold them."""
    shape = {"3-D": (2, 5, 8, 9, 10), "1-D": (2, 6, 900)}.get(layout, (3, 12, 30, 31))
    x = F.R.standard_normal(shape).astype(dtype)
    if layout == "channels-last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    elif layout == "strided":
        x = np.concatenate([x, x], axis=-1)[..., ::2]
    x[0, 1].flat[7], x[1, 2].flat[3], x[2 % len(x), 3].flat[0] = np.nan, np.inf, -np.inf
    want = _ort_node("GlobalAveragePool", np.ascontiguousarray(x)) if dtype == np.float32 \
        else x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)
    got = nn.global_average_pool(np, x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (nn._spatial_sums(x) is None) == (layout == "strided")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


POOL_CASES = {
    "2x2": dict(kernel_shape=[2, 2], strides=[2, 2]),
    "3x3-stride2-pad1": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "3x3-ceil": dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    "3x2-dilated-asym-ceil": dict(kernel_shape=[3, 2], strides=[1, 2], pads=[2, 0, 1, 1], dilations=[2, 1],
                                  ceil_mode=1),
    "2x2-same-stride1": dict(kernel_shape=[2, 2], auto_pad="SAME_UPPER"),
    "1x1-stride2": dict(kernel_shape=[1, 1], strides=[2, 2]),
}


def _max_pool(x, **attrs):
    a = dict(auto_pad="NOTSET", ceil_mode=0, dilations=None, pads=None, strides=None, storage_order=0)
    return nn.max_pool(np, x, **{**a, **attrs})[0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(POOL_CASES))
def test_max_pool_through_the_kernel_matches_onnxruntime_and_the_numpy_form(name, dtype, numpy_forms,
                                                                            monkeypatch):
    attrs = POOL_CASES[name]
    ran, call = [], cpu._call
    monkeypatch.setattr(cpu, "_call", lambda kernel, *a: ran.append(kernel) or call(kernel, *a))
    x = F.R.standard_normal((2, 12, 11, 9)).astype(dtype)
    got = _max_pool(x, **attrs)
    assert ran == ["max_pool"]
    want = _ort_node("MaxPool", x, **attrs)
    assert got.shape == want.shape and got.dtype == x.dtype
    np.testing.assert_array_equal(got, want)
    # NaN and infinities against the NumPy form (ONNX leaves a NaN's fate in a max open)
    x.flat[F.R.integers(0, x.size, 40)] = np.nan
    x.flat[F.R.integers(0, x.size, 40)] = -np.inf
    x.flat[F.R.integers(0, x.size, 10)] = np.inf
    got = _max_pool(x, **attrs)
    with numpy_forms():
        plain = _max_pool(x, **attrs)
    np.testing.assert_array_equal(got, plain)          # NaN where NaN


SHORT_AXES = [((3, 7, 2, 5, 2, 16), (2, 4), True), ((4, 3, 12), (1,), True), ((2, 3, 2, 3, 9), (0, 1), True),
              ((5, 2, 6, 3, 10), (1, 3), True), ((3, 2, 2, 2, 16), (1, 2, 3), False),   # three axes
              ((4, 2, 6, 2, 3), (1, 3), False)]                                      # 3 values a row


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("shape, axes, kernel", SHORT_AXES)
@pytest.mark.parametrize("name", ["ReduceMax", "ReduceMin"])
def test_max_and_min_over_short_axes_are_numpys_reduction(name, shape, axes, kernel, keepdims, monkeypatch):
    from gpu_mdf.engine.ops import OPS
    ran, call = [], cpu._call
    monkeypatch.setattr(cpu, "_call", lambda k, *a: ran.append(k) or call(k, *a))
    x = F.R.standard_normal(shape).astype(np.float32)
    x.flat[F.R.integers(0, x.size, 6)] = np.nan
    x.flat[F.R.integers(0, x.size, 6)] = -np.inf
    got = OPS[f"onnx::{name}"].kernel(np, x, axes=list(axes), keepdims=keepdims)
    reduce = np.max if name == "ReduceMax" else np.min
    want = reduce(x, axis=axes, keepdims=bool(keepdims))
    assert ran == (["reduce_tiles"] if kernel else [])
    assert got.shape == want.shape and got.dtype == x.dtype
    np.testing.assert_array_equal(got, want)           # NaN where NaN
    # a layout the kernel does not take (a transposed view) runs NumPy's fold, same values
    ran.clear()
    xt = np.swapaxes(x, 0, -1)
    got = OPS[f"onnx::{name}"].kernel(np, xt, axes=[1], keepdims=keepdims)
    assert ran == []
    np.testing.assert_array_equal(got, reduce(xt, axis=1, keepdims=bool(keepdims)))


def test_a_kernel_gives_the_same_bits_from_any_thread():
    x = np.ascontiguousarray(F.R.standard_normal((4, 23, 19, 24)).astype(np.float32))
    w = F.R.standard_normal((24, 1, 3, 3)).astype(np.float32)
    b = F.R.standard_normal(24).astype(np.float32)
    args = (x, w, b, (3, 3), (2, 1), (1, 2), (1, 2, 1, 2), (12, 17))
    first = cpu.depthwise(*args)
    results, errors = [], []

    def worker():
        try:
            for _ in range(5):
                results.append(cpu.depthwise(*args))
        except Exception as e:          # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20
    for r in results:
        np.testing.assert_array_equal(r, first)


def test_two_threads_first_use_of_the_kernels_both_succeed():
    """The kernels load once under a lock: two threads reaching them first in a fresh process
    (two compiles at once, say) both get them (a race once jitted a jitted function twice)."""
    import subprocess
    import sys
    code = """
import threading, numpy as np
from gpu_mdf.engine.ops import nn
x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
w = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)
bar, res = threading.Barrier(4), {}
def work(i):
    bar.wait()
    try:
        if i % 2:
            res[i] = nn.max_pool(np, x, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=[2, 2],
                                 pads=None, strides=[2, 2], storage_order=0)[0].shape
        else:
            res[i] = nn.conv(np, x, w).shape
    except Exception as e:
        res[i] = repr(e)
ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
print(sorted(res.items()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[(0, (1, 4, 6, 6)), (1, (1, 3, 4, 4)), (2, (1, 4, 6, 6)), (3, (1, 3, 4, 4))]", r.stdout


def test_kernel_outputs_are_held_to_the_compile_time_budget():
    """A tiny input with huge pads: the kernels refuse the output before allocating it, as
    the NumPy forms (their padded copy) do."""
    from gpu_mdf.engine.ops import folding
    from gpu_mdf.errors import CompileError
    x = np.ones((1, 2, 1, 1), np.float32)
    with folding(1 << 20), pytest.raises(CompileError, match="exceeds the compile-time limit"):
        _max_pool(x, kernel_shape=[1, 1], pads=[1500] * 4)
    with folding(1 << 20), pytest.raises(CompileError, match="exceeds the compile-time limit"):
        nn.conv(np, x, np.ones((2, 1, 1, 1), np.float32), group=2, pads=[1500] * 4)


def test_a_conv_runner_is_kept_per_shape_and_attributes_and_a_bad_one_refused_every_time():
    """nn._conv keeps each conv's runner (its checked geometry and chosen algorithm) by
    shapes and attributes: the same conv with other pads, strides or dilations, or another
    batch, gets its own (ONNX Runtime's values each time, asked in turns); a conv that does
    not fit is refused on every call."""
    from gpu_mdf.engine.ops import OpError
    x = F.R.standard_normal((2, 4, 9, 9)).astype(np.float32)
    w = F.R.standard_normal((6, 4, 3, 3)).astype(np.float32)
    attrs = [dict(pads=[1, 1, 1, 1]), dict(pads=[0, 1, 2, 0]), dict(strides=[2, 2]), dict(dilations=[2, 1]),
             dict(auto_pad="SAME_UPPER", strides=[2, 1])]
    for _ in range(2):
        for a in attrs:
            for xs in (x, x[:1]):
                np.testing.assert_allclose(nn.conv(np, xs, w, **a), _ort_conv(xs, w, None, **a), rtol=1e-5, atol=1e-5)
    assert sum(k[1] == x.shape and k[3] == w.shape for k in nn._RUNNERS) == len(attrs)
    for _ in range(2):
        with pytest.raises(OpError, match="does not fit an axis"):
            nn.conv(np, x[..., :2, :2], w)
        with pytest.raises(OpError, match="group 3 do not fit"):
            nn.conv(np, x, w, group=3)


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_negative_pads_are_refused(kernels, numpy_forms):
    import contextlib

    from gpu_mdf.engine.ops import OpError
    x = F.R.standard_normal((1, 4, 6, 6)).astype(np.float32)
    with numpy_forms() if kernels == "off" else contextlib.nullcontext():
        with pytest.raises(OpError, match="negative pads"):
            _max_pool(x, kernel_shape=[2, 2], pads=[-1, 0, 0, 0])
        with pytest.raises(OpError, match="negative pads"):
            nn.conv(np, x, F.R.standard_normal((4, 1, 3, 3)).astype(np.float32), group=4, pads=[0, 0, 0, -1])


COMPILED_OPS = sorted(op for op in FUSIBLE if FUSIBLE[op].py)


def test_the_ops_left_to_numpy_are_the_transcendental_ones():
    assert set(FUSIBLE) - set(COMPILED_OPS) == {"onnx::Exp", "onnx::Tanh", "onnx::Sigmoid"}
    assert not compiles((Instr("onnx::Exp", 0), Instr("onnx::Tanh", "r0")))      # nothing to compile
    assert compiles((Instr("onnx::Add", 0, 1), Instr("onnx::Sigmoid", "r0")))     # cut around the tanh
    # float32 chains compile tanh, sigmoid and exp too (cpu.tanh32, sigmoid32, exp32): none
    # left to NumPy there; float64 as before
    assert [op for op in FUSIBLE if not FUSIBLE[op].py_form(np.float32)] == []
    assert [op for op in FUSIBLE if not FUSIBLE[op].py_form(np.float64)] == ["onnx::Sigmoid", "onnx::Tanh",
                                                                          "onnx::Exp"]
    assert compiles((Instr("onnx::Tanh", 0), Instr("onnx::Tanh", "r0")), np.float32)
    assert not compiles((Instr("onnx::Tanh", 0), Instr("onnx::Tanh", "r0")), np.float64)


def _chain_fn_values(name, a):
    import numba
    fn = cpu._chain_functions(numba)[name]

    @numba.njit(error_model="numpy")
    def apply(a, out):
        for i in range(a.size):
            out[i] = fn(a[i])
    out = np.empty_like(a)
    apply(a, out)
    return out


def _tanh32_values(a):
    return _chain_fn_values("tanh32", a)


def _ulps(got, ref):
    """|got - ref| in units of the float32 spacing at ref (at least the smallest subnormal)."""
    with np.errstate(over="ignore"):
        spacing = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - ref) / np.maximum(spacing, float(np.finfo(np.float32).smallest_subnormal))


def test_exp32_and_sigmoid32_are_within_1_and_2_5_ulp_and_keep_nan_and_infinities():
    """Float32 chains' compiled exp and sigmoid against float64's: every 61st float32 of -104
    to 89 (23 million values: exp where its result is a normal float32, the sigmoid
    everywhere it is one, the tails included, where 0.5 tanh(x/2) + 0.5 loses all relative
    accuracy); overflow to inf, underflow to 0, NaN kept."""
    pos = np.arange(0, np.float32(89.0).view(np.int32), 61, dtype=np.int32).view(np.float32)
    neg = -np.arange(1, np.float32(104.0).view(np.int32), 61, dtype=np.int32).view(np.float32)
    a = np.concatenate([pos, neg])
    e = _chain_fn_values("exp32", a)
    ref = np.exp(a.astype(np.float64))
    normal = (ref >= np.finfo(np.float32).tiny) & (ref <= np.finfo(np.float32).max)
    assert _ulps(e, ref)[normal].max() <= 1.0
    sig = _chain_fn_values("sigmoid32", a)
    ref = 1 / (1 + np.exp(-a.astype(np.float64)))
    assert _ulps(sig, ref)[ref >= np.finfo(np.float32).tiny].max() <= 2.5
    assert (sig >= 0).all() and (sig <= 1).all()
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 88.8, -110.0], np.float32)
    got = _chain_fn_values("exp32", special)
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], [np.inf, 0, 1, 1, np.inf, 0])
    got = _chain_fn_values("sigmoid32", special)
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], [1, 0, 0.5, 0.5, 1, 0])


def test_tanh32_is_within_7_ulp_of_tanh_odd_and_keeps_nan_and_infinities():
    """The float32 chains' compiled tanh (Eigen's and ONNX Runtime's rational function)
    against float64's tanh: every 61st float32 of magnitude 1e-30 to 20 (14 million of them),
    both signs; exactly odd; +-1 at +-inf and beyond the clamp; NaN stays NaN; signed zeros."""
    lo, hi = np.array([1e-30, 20.0], np.float32).view(np.int32)
    pos = np.arange(lo, hi, 61, dtype=np.int32).view(np.float32)
    a = np.concatenate([pos, -pos])
    got = _tanh32_values(a)
    ref = np.tanh(a.astype(np.float64))
    ulps = np.abs(got - ref) / np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 7, f"{ulps.max():.2f} ulp at {a[ulps.argmax()]!r}"
    assert np.abs(got - ref).max() <= 4.2e-7
    np.testing.assert_array_equal(got[:pos.size], -got[pos.size:])
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 9.5, -3.4e38], np.float32)
    got = _tanh32_values(special)
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], [1, -1, 0, -0.0, 1, -1, 1, -1])
    assert np.signbit(got[4]) and not np.signbit(got[3])


SEGMENTED = {
    "silu": ((Instr("onnx::Sigmoid", 0), Instr("onnx::Mul", 0, "r0")), ["x"]),
    "squeeze-excite": ((Instr("onnx::Add", 0, 1), Instr("onnx::Sigmoid", "r0"), Instr("onnx::Mul", "r1", 2)),
                       ["x", "channel", "full"]),
    "exp-first": ((Instr("onnx::Exp", 0), Instr("onnx::Add", "r0", 1)), ["x", "channel"]),
    "two-tanh": ((Instr("onnx::Add", 0, 1), Instr("onnx::Tanh", "r0"), Instr("onnx::Tanh", "r1")), ["x", "scalar"]),
    "mixed": ((Instr("onnx::Mul", 0, 1), Instr("onnx::Exp", "r0"), Instr("onnx::Relu", "r1"),
               Instr("onnx::Sigmoid", "r2"), Instr("onnx::Sub", 2, "r3")), ["x", "scalar", "full"]),
}


# in place only where the planner allows it: the chain's input read by its first op alone
IN_PLACE = [(name, inplace) for name, (program, _) in sorted(SEGMENTED.items()) for inplace in (False, True)
            if not inplace or all(0 not in (i.a, i.b) for i in program[1:])]


def _segmented_case(name, layout):
    program, kinds = SEGMENTED[name]
    r = np.random.default_rng(0)
    shape = (2, 24, 6, 3) if layout == "small" else (4, 24, 20, 18)
    x = (r.standard_normal(shape) * 4).astype(np.float32)
    x.flat[::97] = np.nan
    x.flat[1::101] = np.inf
    x.flat[2::103] = -np.inf
    if layout == "channels-last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    make = {"x": lambda: x, "channel": lambda: r.standard_normal((24, 1, 1)).astype(np.float32),
            "scalar": lambda: np.asarray(0.75, np.float32),
            "full": lambda: np.moveaxis(np.ascontiguousarray(np.moveaxis(r.standard_normal(x.shape), 1, -1)), -1, 1
                                        ).astype(np.float32) if layout == "channels-last"
            else r.standard_normal(x.shape).astype(np.float32)}
    return program, [make[k]() for k in kinds]


def _run_segmented(program, ops, inplace, dtype):
    from gpu_mdf.engine.ops.fusion import segments
    with np.errstate(all="ignore"):
        want = run_numpy(program, [o.copy() for o in ops])
        segs = segments(program, dtype)
        chains = [cpu.fused(seg.program, np.float32) if seg.program else None for seg in segs]
        work = [ops[0].copy(order="K")] + ops[1:]
        got = cpu.run_segments(segs, chains, work, inplace, np.float32)
    assert (got is work[0]) == inplace
    return segs, got, want


@pytest.mark.parametrize("layout", ["channels-last", "contiguous", "small"])
@pytest.mark.parametrize("name, inplace", IN_PLACE)
def test_segmented_chains_give_numpys_bits(name, inplace, layout):
    """A chain with exp, tanh or sigmoid runs cut around them (sigmoid as its NumPy form's own
    steps): the same IEEE operations as NumPy's forms, so the same bits, NaN and infinities
    included, on every layout."""
    program, ops = _segmented_case(name, layout)
    _, got, want = _run_segmented(program, ops, inplace, None)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", ["channels-last", "contiguous", "small"])
@pytest.mark.parametrize("name, inplace", IN_PLACE)
def test_float32_chains_run_tanh_compiled_within_its_error(name, inplace, layout):
    """Not cut in float32: tanh, sigmoid and exp run inside the compiled loop (cpu.tanh32,
    sigmoid32, exp32). NaN and infinities where NumPy's forms have them; the rest within
    their few ulp carried through the chain (values up to 16 here)."""
    program, ops = _segmented_case(name, layout)
    segs, got, want = _run_segmented(program, ops, inplace, np.float32)
    assert len(segs) == 1 and not segs[0].op
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("first", ["per channel", "whole"])
def test_a_float32_gate_broadcast_larger_runs_numpys_tanh_on_the_small_value(first, monkeypatch):
    """sigmoid(s) * x: with s one value a channel, the chain is cut so that NumPy's sigmoid runs
    on s alone (NumPy's bits); with s as large as the result, tanh32 runs in the loop."""
    from gpu_mdf.engine.steps import _compiled_chain
    program = (Instr("onnx::Sigmoid", 0), Instr("onnx::Mul", "r0", 1))
    small = F.R.standard_normal((2, 24, 1, 1)).astype(np.float32)
    full = F.R.standard_normal((2, 24, 10, 10)).astype(np.float32)
    ops = [small, full] if first == "per channel" else [full, small]
    ran = []
    real = cpu.run_segments
    monkeypatch.setattr(cpu, "run_segments", lambda segs, *a: ran.append(segs) or real(segs, *a))
    got = _compiled_chain(program, np.dtype(np.float32), [lambda env, o=o: o for o in ops], False, None)({})
    want = run_numpy(program, ops)
    assert any(seg.op == "onnx::Sigmoid" for seg in ran[0]) == (first == "per channel")
    if first == "per channel":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", COMPILED_OPS)
def test_compiled_fused_op_agrees_with_numpy_on_special_values(op, dtype):
    program, operands = fused_special.case(op, dtype)
    a = operands[0]
    with np.errstate(all="ignore"):
        want = run_numpy(program, operands)
        chain = cpu.fused(program, dtype)
        by_ufunc = chain.ufunc(*operands)
        by_rows = np.empty((1, a.size), a.dtype)
        chain.rows(frozenset(), a.reshape(1, -1), *operands[1:], by_rows)
    for got in (by_ufunc, by_rows.reshape(-1)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(got[~np.isnan(want)], want[~np.isnan(want)])   # IEEE operations: exact
        np.testing.assert_array_equal(np.signbit(got[~np.isnan(want)]), np.signbit(want[~np.isnan(want)]))


def test_compiled_chain_broadcasts_and_writes_in_place_as_numpy_does():
    program = (Instr("onnx::Add", 0, 1), Instr("onnx::Relu", "r0"), Instr("onnx::Mul", "r1", 2),
               Instr("onnx::Clip", "r2", None, (("min", -0.5), ("max", 0.75))))
    x = np.moveaxis(F.R.standard_normal((3, 5, 6, 4)).astype(np.float32), -1, 1)       # NCHW view, NHWC memory
    bias, scale = F.R.standard_normal((4, 1, 1)).astype(np.float32), np.float32(1.7) * np.ones((), np.float32)
    want = run_numpy(program, [x.copy(), bias, scale])
    u = cpu.fused(program, np.float32).ufunc
    got = u(x, bias, scale)
    np.testing.assert_array_equal(got, want)
    assert got.strides == x.strides                     # the input's memory order kept
    buf = x.copy(order="K")
    assert u(buf, bias, scale, out=buf) is buf
    np.testing.assert_array_equal(buf, want)


@pytest.mark.parametrize("name", CASES)
def test_golden_corpus_same_with_the_kernels_on_and_off(name, numpy_forms):
    path, feeds, consts, _ = load(name)
    on = compile(path, device="cpu", constants=consts).run(feeds or None, check=False)
    with numpy_forms():
        off = compile(path, device="cpu", constants=consts).run(feeds or None, check=False)
    on, off = (v if isinstance(v, dict) else {"y": v} for v in (on, off))
    assert on.keys() == off.keys()
    for k in on:
        a, b = np.asarray(on[k]), np.asarray(off[k])
        assert a.shape == b.shape and a.dtype == b.dtype, (name, k)
        if b.dtype.kind != "f":
            np.testing.assert_array_equal(a, b, err_msg=f"{name}:{k}")
            continue
        finite = b[np.isfinite(b)]
        scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{name}:{k}")
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale, equal_nan=True, err_msg=f"{name}:{k}")


def test_turned_off_the_numpy_forms_run_and_describe_says_why(numpy_forms, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "_call", lambda *a: calls.append(a[0]))
    x = F.R.standard_normal((1, 4, 6, 6)).astype(np.float32)
    w = F.R.standard_normal((4, 1, 3, 3)).astype(np.float32)
    with numpy_forms():
        assert not cpu.available() and cpu.describe() == "numpy (GPU_MDF_NUMBA=0)"
        nn.conv(np, x, w, group=4)
    assert calls == []
    assert cpu.describe().startswith("numba ")


@pytest.mark.parametrize("seed", range(12))
def test_compiled_chain_in_rows_is_numpy_on_any_layout(seed):
    """Per-channel operands over values laid out in any order (channels-last views, size-1
    axes, slices that are not one block of memory), in place or not: NumPy's bits."""
    _chain_case(seed)


def test_compiled_chain_in_rows_is_taken_where_it_applies():
    taken = [_chain_case(seed) for seed in range(12)]
    assert 4 <= sum(taken) < 12, taken


def _chain_case(seed) -> bool:
    """One layout case checked; whether it ran in rows."""
    r = np.random.default_rng(seed)
    program = (Instr("onnx::Add", 0, 1), Instr("onnx::Relu", "r0"), Instr("onnx::Mul", "r1", 2),
               Instr("onnx::Sub", "r2", 3), Instr("onnx::Add", 4, "r3"))
    shape = [int(v) for v in r.integers(1, 30, size=4)]
    shape[r.integers(4)] = 1
    shape[r.integers(4)] = int(r.integers(40, 90))
    perm = [int(v) for v in r.permutation(4)]
    base = r.standard_normal(tuple(shape[p] for p in perm)).astype(np.float32)
    x = np.transpose(base, np.argsort(perm))                 # shape `shape`, memory in `perm` order
    if seed % 4 == 3:
        x = x[:, :, ::2]                                      # not one block: the generic call
    axis = perm[3] if seed % 3 else int(r.integers(4))         # mostly the innermost axis of memory
    per_axis = [1] * 4
    per_axis[axis] = x.shape[axis]
    # a residual: a whole tensor laid out as x (or, for some seeds, otherwise: the generic call)
    residual = np.empty_like(x) if seed % 5 else np.empty(x.shape, np.float32)
    residual[...] = r.standard_normal(x.shape)
    scalar = np.float32(0.5) if seed % 2 else np.full((1, 1, 1, 1), 0.5, np.float32)   # of any rank
    ops = [x, r.standard_normal(per_axis).astype(np.float32), scalar,
           r.standard_normal(per_axis[1:]).astype(np.float32), residual]
    want = run_numpy(program, [x.copy()] + ops[1:])
    u = cpu.fused(program, np.float32)
    np.testing.assert_array_equal(cpu.run_chain(u, ops, inplace=False), want)
    buf = x.copy(order="K")
    out = cpu.run_chain(u, [buf] + ops[1:], inplace=True)
    assert out is buf
    np.testing.assert_array_equal(buf, want)
    return cpu._rows(x, ops[1:]) is not None


def test_a_chains_source_holds_no_value_of_the_model():
    """The exec'd source of a compiled chain is the fusion table's templates and names made
    here: an attribute's value is a namespace constant, never text; a reference that is not
    an operand number or the previous result is refused. The numbers still match NumPy's."""
    from gpu_mdf.engine.ops.fusion import py_chain, py_rows
    alpha, lo, hi = 0.3183098861837907, -1.2345678, 2.7182818
    program = (Instr("onnx::Add", 0, 1), Instr("onnx::LeakyRelu", "r0", None, (("alpha", alpha),)),
               Instr("onnx::Clip", "r1", None, (("min", lo), ("max", hi))))
    for source, consts in (py_chain(program), py_rows(program)):
        assert not any(repr(v) in source or repr(np.float32(v)) in source for v in (alpha, lo, hi))
        assert sorted(consts.values()) == sorted([alpha, lo, hi])
    for bad in ("__import__('os')", "r5", 1.5):
        with pytest.raises(ValueError):
            py_rows((Instr("onnx::Add", 0, 1), Instr("onnx::Relu", bad)))
    # at the exec itself: text the generator does not write is refused, whatever made it
    for text in ("__import__('os').getcwd()", "open({a}).read()", "{a}.__class__", "'{a}'", "eval('{a}')"):
        with pytest.raises(ValueError, match="refused"):
            cpu._generated_only(f"def chain(x0):\n    r0 = T({text.format(a='x0')})\n    return r0\n", {})
    with pytest.raises(ValueError, match="refused"):
        cpu._generated_only("def chain(x0):\n    return x0\n", {"c0_alpha": "os"})
    for source, consts in (py_chain(program), py_rows(program, frozenset({1}))):
        cpu._generated_only(source, consts)               # what the generator writes passes
    # float32's own forms add calls of the kernels' functions only, by fixed names
    import ast
    transcendental = (Instr("onnx::Sigmoid", 0), Instr("onnx::Tanh", "r0"), Instr("onnx::Exp", "r1"))
    for source, consts in (py_chain(transcendental, np.float32), py_rows(transcendental, frozenset(), np.float32)):
        cpu._generated_only(source, consts)
        called = {n.func.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
                  and isinstance(n.func, ast.Name)}
        assert called <= {"T", "range", "sigmoid32", "tanh32", "exp32"} and not consts
    b = F.R.standard_normal(8).astype(np.float32)
    for rows in (64, 4096):                           # the ufunc, and the row loop
        x = F.R.standard_normal((rows, 8)).astype(np.float32) * 3
        got = cpu.run_chain(cpu.fused(program, np.float32), [x, b], False)
        np.testing.assert_array_equal(got, run_numpy(program, [x.copy(), b]))
