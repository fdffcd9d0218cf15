"""Compiled CPU kernels for what NumPy has no fast form of, through numba where it is
installed (``pip install 'gpu-mdf[cpu]'``); NumPy's forms otherwise (`nn.py`).

* :func:`depthwise`: a 2-D depthwise convolution, channels-last, the padding in the index
  arithmetic, the bias added at the end: one pass over the input (NumPy's ``einsum`` over
  the window view runs at about 1 GMAC/s; this at 5-10x that);
* :func:`im2col`: a 2-D convolution's columns (N, OH, OW, KH, KW, C) with the zeros of the
  padding written in place (no padded copy of the input);
* :func:`max_pool`: a 2-D max pooling, channels-last, the padding (and ``ceil_mode``'s
  overhang) skipped in the index arithmetic; :func:`reduce_tiles`: a max or min over
  one or two short axes of a contiguous array (pooling written as reshape + reduce, as the
  Keras converter writes it): one pass each, where NumPy makes a pass per window element;
* :func:`fused` / :func:`run_segments`: a fused elementwise chain
  (:mod:`~gpu_mdf.engine.ops.fusion`), generated from the ops' Python forms: a loop over
  rows of about 4,096 contiguous values where the operands allow it (SIMD code; 2-5x
  NumPy's in-place ufuncs), a ufunc elsewhere. In float32, tanh, sigmoid and exp run inside
  the loop (:func:`tanh32`, and exp32 and sigmoid32 of :func:`_chain_functions`); in float64
  they stay NumPy's, the chain cut around them. Chains are compiled once a process (0.1-0.2 s each).

Each kernel runs on the calling thread (``nogil``: `Program.run` spreads a large batch's
blocks over the cores itself). A ``prange`` form over every core was measured and dropped:
never faster than this one for the batches that run in one block (0.9-1.0x), and 2-6x
slower beside OpenBLAS's threads under GNU OpenMP's spinning workers (MobileNetV2 at
batch 1: 102 ms against 18 ms). Without ``fastmath``: each output element is computed by
the same loop in the same order, whichever thread runs it.

``GPU_MDF_NUMBA=0`` turns the kernels off (the NumPy forms run), for comparisons and
for machines where numba misbehaves. Compiled code is cached on disk by numba: the first
call of a kernel in a fresh environment compiles it (a few seconds), later processes load it.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import re
import threading
from dataclasses import dataclass, field

import numpy as np

from . import remembered, weight_form
from .fusion import FUSIBLE, KERNEL_DTYPES, PREV, broadcast_shape

_kernels: dict | None = None
_why_not: str | None = None
_chains: dict = {}
_chains_lock = threading.RLock()


def _disabled() -> bool:
    v = os.environ.get("GPU_MDF_NUMBA")             # read per call: a test or a user may set it any time
    return v is not None and v.strip().lower() in ("0", "false", "no", "off")


def available() -> bool:
    """Whether the compiled kernels run here (numba imports and is not turned off)."""
    return not _disabled() and _load() is not None


def describe() -> str:
    """Which CPU kernels run: 'numba X.Y' or 'numpy (why)'; recorded by the golden corpus."""
    if _disabled():
        return "numpy (GPU_MDF_NUMBA=0)"
    if _load() is None:
        return f"numpy ({_why_not})"
    import numba
    return f"numba {numba.__version__}"


def takes(dtype) -> bool:
    """Whether the compiled kernels run here for values of this type."""
    return available() and np.dtype(dtype) in KERNEL_DTYPES


def _call(name: str, *args):
    return _load()[name](*args)


def _load():
    """The compiled kernels ({name: function}), or None (``_why_not`` says why). Made once,
    under a lock (two threads' first compiles meet here), and published whole."""
    global _kernels, _why_not, _combine, _im2col, _image_columns, _conv_images, _depthwise_either, _row_taps, \
        _activate, _add_act, _depthwise_pixel, _depthwise, _depthwise_rows, _bias_act
    if _kernels is not None or _why_not is not None:
        return _kernels
    with _chains_lock:
        if _kernels is not None or _why_not is not None:
            return _kernels
        try:
            import numba
        except ModuleNotFoundError:
            _why_not = "numba is not installed: pip install 'gpu-mdf[cpu]'"
            return None
        except Exception as e:  # a numba that does not match this NumPy, say
            _why_not = f"numba is not usable: {type(e).__name__}: {e}".split("\n")[0]
            return None
        # called inside the kernels (inlined: a constant argument is a constant there)
        _combine = numba.njit(inline="always", nogil=True)(_combine)
        _im2col = numba.njit(inline="always", nogil=True)(_im2col)
        _image_columns = numba.njit(inline="always", nogil=True)(_image_columns)
        _conv_images = numba.njit(inline="always", nogil=True)(_conv_images)
        _depthwise_either = numba.njit(inline="always", nogil=True)(_depthwise_either)
        _row_taps = numba.njit(inline="always", nogil=True)(_row_taps)
        _activate = numba.njit(inline="always", nogil=True)(_activate)
        _add_act = numba.njit(inline="always", nogil=True)(_add_act)
        _depthwise_pixel = numba.njit(nogil=True)(_depthwise_pixel)
        # kernels that the fused expand-depthwise kernel calls too (numba dispatchers by name)
        _depthwise, _depthwise_rows, _bias_act = (_njit(numba, body) for body in (_depthwise, _depthwise_rows,
                                                                                   _bias_act))
        kernels = {name: _njit(numba, body) for name, body in
                   (("max_pool", _max_pool), ("reduce_tiles", _reduce_tiles), ("expand depthwise", _expand_depthwise),
                    ("im2col 2", _im2col_2), ("im2col 3", _im2col_3), ("im2col 4", _im2col_4),
                    ("im2col any C", _im2col_any), ("winograd tiles", _winograd_tiles),
                    ("winograd untiles", _winograd_untiles), ("conv images 3x3 1", _conv_images_3x3_1),
                    ("conv images 3x3 2", _conv_images_3x3_2), ("conv images 3x3 3", _conv_images_3x3_3),
                    ("conv images 3x3 4", _conv_images_3x3_4), ("conv images", _conv_images_any))}
        kernels.update({"depthwise": _depthwise, "depthwise rows": _depthwise_rows, "bias act": _bias_act})
        kernels["im2col"] = lambda x, *args: kernels[_IM2COL.get(x.shape[-1], "im2col any C")](x, *args)
        _kernels = kernels
    return _kernels


_IM2COL = {2: "im2col 2", 3: "im2col 3", 4: "im2col 4"}


def _njit(numba, body):
    """``numba.njit`` with its disk cache (beside this file, or in the user's cache folder),
    or without one where neither can be written."""
    try:
        return numba.njit(cache=True, nogil=True)(body)
    except RuntimeError:                # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(body)


# --------------------------------------------------------------------------- #
# Kernel bodies (numba nopython; plain Python semantics otherwise)
# --------------------------------------------------------------------------- #
def tanh32(x):
    """tanh of a float32 in float32 operations as Eigen and ONNX Runtime's MLAS compute it: a
    rational function of degree 13/6 on x clamped to [-9, 9], no libm call, so numba
    vectorises a chain around it (EfficientNet's SiLU in one pass: 1.6-1.8x NumPy's five
    in-place passes, tanh among them). Within 6.9 ulp of tanh (4.1e-7 absolute), measured
    on every float32 of magnitude 1e-30 to 20 (NumPy's own float32 tanh: 1.4 ulp); odd, within
    [-1, 1] (the rational function alone reaches 1.0000001 near 8.5, which made a sigmoid of
    -16 negative), +-1 at +-inf; NaN stays NaN (the clamps compare so that NaN passes)."""
    x = np.float32(9.0) if x > np.float32(9.0) else x
    x = np.float32(-9.0) if x < np.float32(-9.0) else x
    x2 = x * x
    p = x2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
    p = x2 * p + np.float32(-8.60467152213735e-11)
    p = x2 * p + np.float32(5.12229709037114e-08)
    p = x2 * p + np.float32(1.48572235717979e-05)
    p = x2 * p + np.float32(6.37261928875436e-04)
    p = x2 * p + np.float32(4.89352455891786e-03)
    q = x2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
    q = x2 * q + np.float32(2.26843463243900e-03)
    q = x2 * q + np.float32(4.89352518554385e-03)
    t = x * p / q
    t = np.float32(1.0) if t > np.float32(1.0) else t           # the rational function passes 1 by an ulp
    return np.float32(-1.0) if t < np.float32(-1.0) else t      # near +-8.5: a sigmoid of it would be < 0


_chain_fns: dict | None = None


def _chain_functions(numba) -> dict:
    """The functions a chain's generated source may call (compiled once, inlined there):
    :func:`tanh32`, and ``exp32`` and ``sigmoid32``: exp of a float32 in float32 operations,
    vectorisable (Cody and Waite's reduction by ln 2, Cephes' degree-7 polynomial, the power
    of two made from its bits, in two halves so that 2^-150..2^128 stay in range): within
    1 ulp of exp wherever exp is a normal float32, inf above 88.72, 0 below -104, NaN kept;
    and 1 / (1 + exp32(-x)): within 2.5 ulp of the sigmoid everywhere (0.5 tanh(x/2) + 0.5,
    the fused form before, lost all relative accuracy below -17: 0 where it is 1e-8).
    Measured on every 7th float32 of -104 to 89."""
    global _chain_fns
    if _chain_fns is not None:
        return _chain_fns
    import llvmlite.ir as lir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def f32_from_bits(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], lir.FloatType())
        return types.float32(types.int32), codegen

    f = np.float32
    jit = numba.njit(inline="always", nogil=True, error_model="numpy")

    @jit
    def exp32(x):
        c = f(89.0) if x > f(89.0) else x
        c = f(-104.0) if c < f(-104.0) else c
        c = c if c == c else f(0.0)                          # (NaN: from r below)
        n = (c * f(1.44269504088896341) + f(12582912.0)) - f(12582912.0)    # round(c / ln 2)
        r = c - n * f(0.693359375)
        r = r - n * f(-2.12194440e-4)
        r = r if x == x else x
        p = f(1.9875691500e-4) * r + f(1.3981999507e-3)
        p = p * r + f(8.3334519073e-3)
        p = p * r + f(4.1665795894e-2)
        p = p * r + f(1.6666665459e-1)
        p = p * r + f(5.0000001201e-1)
        p = p * (r * r) + r + f(1.0)
        k = np.int32(n)
        h = k >> 1
        return p * f32_from_bits((h + 127) << 23) * f32_from_bits((k - h + 127) << 23)

    @jit
    def sigmoid32(x):
        return f(1.0) / (f(1.0) + exp32(-x))

    _chain_fns = {"tanh32": jit(tanh32), "exp32": exp32, "sigmoid32": sigmoid32}
    return _chain_fns


#: an activation epilogue's ops (:func:`epilogue_codes`): none, Relu, Clip(lo, hi), min(x, c)
_EPILOGUE_OPS = {"onnx::Relu": 1, "onnx::Clip": 2, "gpu_mdf::CapAt": 3}


def _activate(o, act):
    """The epilogue ``act`` (two (code, lo, hi) ops, :func:`epilogue_codes`) on the row ``o``
    in place, just written (in cache): each op as its fused form's Python text writes it
    (fusion.FUSIBLE), NaN and signed zeros alike; one loop an op (a branch per value
    stopped the kernels' vectorisation: 2x slower)."""
    for k in range(2):
        code, lo, hi = act[3 * k], act[3 * k + 1], act[3 * k + 2]
        if code == 1:                          # Relu (lo: a zero of the type)
            for j in range(o.shape[0]):
                v = o[j]
                o[j] = lo if v <= 0 else v
        elif code == 2:                        # Clip: min(max(v, lo), hi), hi where lo > hi
            for j in range(o.shape[0]):
                v = o[j]
                v = lo if v < lo else v
                o[j] = hi if v > hi else v
        elif code == 3:                        # min(x, lo), lo where x is NaN
            for j in range(o.shape[0]):
                v = o[j]
                o[j] = lo if (v != v) or lo < v else v


def _bias_act(y, bt, act):
    """y (rows, C), contiguous, in place: each value plus its channel's bias, then the
    epilogue ``act`` (:func:`_activate`): the fused chain's Add and activations, the same
    operations. ``bt``: the bias tiled to k x C values (:func:`_tiled`), so that the loops
    run over rows of k outputs (a row of C values is too short to vectorise); the last
    rows % k rows by themselves."""
    rows, c = y.shape
    k = bt.shape[0] // c
    whole = rows // k * k
    flat = y[:whole].reshape(whole // k, k * c)
    for i in range(flat.shape[0]):
        _add_act(flat[i], bt, act)
    for i in range(whole, rows):
        _add_act(y[i], bt[:c], act)
    return y


def _add_act(o, b, act):
    """The row ``o`` plus ``b``, then ``act``, in place."""
    for j in range(o.shape[0]):
        o[j] = o[j] + b[j]
    _activate(o, act)


def _depthwise(x, w, b, out, sh, sw, dh, dw, pt, pl, act):
    """x (N, H, W, C), w (KH, KW, C), b (C,), out (N, OH, OW, C). Each sum starts at the bias
    and adds the window's terms in row-major order. A 3x3 window inside x (most of them) is
    one expression per channel, its sum in a register, in a loop of its own over the
    row's inner columns; elsewhere (:func:`_depthwise_pixel`) the sum builds in a row of
    its own (which aliases nothing: the compiler vectorises over C). Both add the same
    terms in the same order. The expression indexes flat rows with unsigned offsets: a
    signed index gets numba's wraparound test, and with it the loop ran 4 channels at a
    time with its 19 pointers spilled, where it now runs 16 (1.3-1.8x, 16-96 channels)."""
    n, h, wd, c = x.shape
    kh, kw = w.shape[0], w.shape[1]
    oh, ow = out.shape[1], out.shape[2]
    acc = np.empty(c, dtype=out.dtype)
    wf = w.reshape(kh * kw * c)
    cu = np.uint64(c)
    step = np.uint64(dw * c)
    w1, w2, w3, w4 = cu, np.uint64(2 * c), np.uint64(3 * c), np.uint64(4 * c)   # the taps' weights in wf
    w5, w6, w7, w8 = np.uint64(5 * c), np.uint64(6 * c), np.uint64(7 * c), np.uint64(8 * c)
    lo = 0                                     # the output columns whose windows lie inside x
    while lo < ow and lo * sw - pl < 0:
        lo += 1
    hi = ow
    while hi > lo and (hi - 1) * sw - pl + (kw - 1) * dw >= wd:
        hi -= 1
    for job in range(n * oh):
        i = job // oh
        y = job - i * oh
        y0 = y * sh - pt
        if not (kh == 3 and kw == 3 and y0 >= 0 and y0 + 2 * dh < h):
            for xo in range(ow):
                _depthwise_pixel(x, w, b, out, acc, i, y, xo, y0, xo * sw - pl, dh, dw)
        else:
            r0 = x[i, y0].reshape(wd * c)
            r1 = x[i, y0 + dh].reshape(wd * c)
            r2 = x[i, y0 + 2 * dh].reshape(wd * c)
            o = out[i, y].reshape(ow * c)
            for xo in range(lo, hi):
                a0 = np.uint64((xo * sw - pl) * c)
                a1 = a0 + step
                a2 = a1 + step
                oo = np.uint64(xo * c)
                for cc in range(cu):
                    o[oo + cc] = (b[cc] + r0[a0 + cc] * wf[cc] + r0[a1 + cc] * wf[w1 + cc] + r0[a2 + cc] * wf[w2 + cc]
                                  + r1[a0 + cc] * wf[w3 + cc] + r1[a1 + cc] * wf[w4 + cc] + r1[a2 + cc] * wf[w5 + cc]
                                  + r2[a0 + cc] * wf[w6 + cc] + r2[a1 + cc] * wf[w7 + cc] + r2[a2 + cc] * wf[w8 + cc])
            for xo in range(lo):
                _depthwise_pixel(x, w, b, out, acc, i, y, xo, y0, xo * sw - pl, dh, dw)
            for xo in range(hi, ow):
                _depthwise_pixel(x, w, b, out, acc, i, y, xo, y0, xo * sw - pl, dh, dw)
        _activate(out[i, y].reshape(ow * c), act)
    return out


def _depthwise_pixel(x, w, b, out, acc, i, y, xo, y0, x0, dh, dw):
    """One output pixel of :func:`_depthwise`: the bias, then the window's terms inside x
    in row-major order, summed in ``acc``."""
    h, wd, c = x.shape[1], x.shape[2], x.shape[3]
    for cc in range(c):
        acc[cc] = b[cc]
    for p in range(w.shape[0]):
        yi = y0 + p * dh
        if yi < 0 or yi >= h:
            continue
        for q in range(w.shape[1]):
            xi = x0 + q * dw
            if xi < 0 or xi >= wd:
                continue
            for cc in range(c):
                acc[cc] += x[i, yi, xi, cc] * w[p, q, cc]
    for cc in range(c):
        out[i, y, xo, cc] = acc[cc]


def _expand_depthwise(x, we, bt, act_e, wk, b, out, sh, sw, dh, dw, pt, pl, act, by_rows, wp, project, bpt,
                      act_p, residual, expand):
    """:func:`expand_depthwise_fn`'s loop: per image, with ``expand``, the product into a buffer
    of one image (BLAS through numba's ``np.dot``), its bias and activations by rows of
    ``bt``'s width (:func:`_bias_act`), then the depthwise kernel (per pixel or ``by_rows``)
    on it (on the image of ``x`` without ``expand``); with ``project``, into a second
    buffer, which ``wp`` (CM, CP) then multiplies into ``out``, plus the tiled bias ``bpt``
    where it has values (``act_p``: no activation), then, with ``residual``, the image of
    ``x`` (of the output's shape)."""
    n, h, wd, c = x.shape
    cm = we.shape[1]
    rows = h * wd
    e = np.empty((1, h, wd, cm) if expand else (1, 1, 1, 1), dtype=out.dtype)
    oh, ow = out.shape[1], out.shape[2]
    d = np.empty((1, oh, ow, cm) if project else (1, 1, 1, 1), dtype=out.dtype)
    for i in range(n):
        dest = d if project else out[i:i + 1]
        if expand:
            e2 = e.reshape(rows, cm)
            np.dot(x[i].reshape(rows, c), we, e2)
            _bias_act(e2, bt, act_e)
            _depthwise_either(e, wk, b, dest, by_rows, sh, sw, dh, dw, pt, pl, act)
        else:
            _depthwise_either(x[i:i + 1], wk, b, dest, by_rows, sh, sw, dh, dw, pt, pl, act)
        if project:
            o2 = out[i].reshape(oh * ow, wp.shape[1])
            np.dot(d.reshape(oh * ow, cm), wp, o2)
            if bpt.shape[0]:                       # empty: no bias
                _bias_act(o2, bpt, act_p)
            if residual:
                of, xf = out[i].reshape(o2.size), x[i].reshape(o2.size)
                for j in range(of.shape[0]):
                    of[j] = of[j] + xf[j]
    return out


def _depthwise_either(x, wk, b, out, by_rows, sh, sw, dh, dw, pt, pl, act):
    """:func:`_depthwise_rows` or :func:`_depthwise`."""
    if by_rows:
        _depthwise_rows(x, wk, b, out, sh, dh, dw, pt, pl, act)
    else:
        _depthwise(x, wk, b, out, sh, sw, dh, dw, pt, pl, act)


def _depthwise_rows(x, wt, b, out, sh, dh, dw, pt, pl, act):
    """:func:`_depthwise` with a horizontal stride of 1, for few channels, and M output
    channels per input channel (M = out's C / x's C: ONNX's order, output o reads input
    o // M): an output row (OW x CM values, contiguous) builds in a row of its own from the
    bias, and each kernel offset adds one contiguous run of the input row (each value
    repeated M times where M > 1) times ``wt`` (KH, KW, T x CM: the weights repeated for
    T >= OW columns). For M = 1 the same terms in the same order as :func:`_depthwise` (an
    offset whose input lies outside x adds nothing), bit for bit; one long loop, where the
    loop over a few channels is too short to vectorise."""
    n, h, wd, c = x.shape
    kh = wt.shape[0]
    oh, ow, co = out.shape[1], out.shape[2], out.shape[3]
    mult = co // c
    m = ow * co
    acc = np.empty(m, dtype=out.dtype)
    xe = np.empty(wd * co if mult > 1 else 0, dtype=x.dtype)     # an input row, each value M times
    for job in range(n * oh):
        i = job // oh
        y = job - i * oh
        for xo in range(ow):
            for cc in range(co):
                acc[xo * co + cc] = b[cc]
        for p in range(kh):
            yi = y * sh - pt + p * dh
            if yi < 0 or yi >= h:
                continue
            if mult == 1:
                _row_taps(acc, x[i, yi].reshape(wd * c), wt[p], dw, pl, ow, co, wd)
            else:
                xr = x[i, yi].reshape(wd * c)
                for e in range(wd * c):
                    v = xr[e]
                    for k in range(mult):
                        xe[e * mult + k] = v
                _row_taps(acc, xe, wt[p], dw, pl, ow, co, wd)
        o = out[i, y].reshape(m)
        for j in range(m):
            o[j] = acc[j]
        _activate(o, act)
    return out


def _row_taps(acc, xr, wp, dw, pl, ow, co, wd):
    """acc (OW x CM) += each offset q's run of the input row ``xr`` (W x CM) times wp[q]."""
    for q in range(wp.shape[0]):
        off = q * dw - pl                       # the input column of output column xo: xo + off
        lo = max(0, -off)
        hi = min(ow, wd - off)
        if hi <= lo:
            continue
        # slices, not computed indices: numba checks a computed index for wraparound,
        # which stops the loop's vectorisation
        xs = xr[(lo + off) * co:(hi + off) * co]
        ws = wp[q][lo * co:hi * co]
        a = acc[lo * co:hi * co]
        for j in range(a.shape[0]):
            a[j] += xs[j] * ws[j]


def _image_columns(x, i, cols, oh, ow, kh, kw, c, sh, sw, dh, dw, pt, pl):
    """Image ``i`` of ``x`` (N, H, W, C), contiguous, -> its columns ``cols`` (OH x OW x KH x
    KW x C values, flat), zeros where a window leaves x. ``kw`` and ``c`` are constants where
    a caller below inlines this: a window row inside x (dilation 1) is then one unrolled
    copy of KW x C contiguous values. Flat unsigned indices: numba tests a signed index for
    wraparound (a 3-channel 3x3 stem's columns: 2.5x slower with 6-D indexing, 25x with
    slices)."""
    h, wd = x.shape[1], x.shape[2]
    xf = x.reshape(x.size)
    run = kw * c
    k = kh * run
    image = i * h * wd * c
    for y in range(oh):
        for p in range(kh):
            yi = y * sh - pt + p * dh
            for xo in range(ow):
                d0 = np.uint64((y * ow + xo) * k + p * run)
                x0 = xo * sw - pl
                if yi < 0 or yi >= h:
                    for j in range(run):
                        cols[d0 + np.uint64(j)] = 0
                elif dw == 1 and x0 >= 0 and x0 + kw <= wd:
                    s0 = np.uint64(image + (yi * wd + x0) * c)
                    for j in range(run):
                        cols[d0 + np.uint64(j)] = xf[s0 + np.uint64(j)]
                else:
                    for q in range(kw):
                        xi = x0 + q * dw
                        for cc in range(c):
                            if xi < 0 or xi >= wd:
                                cols[d0 + np.uint64(q * c + cc)] = 0
                            else:
                                cols[d0 + np.uint64(q * c + cc)] = xf[np.uint64(image + (yi * wd + xi) * c + cc)]


def _im2col(x, cols, c, sh, sw, dh, dw, pt, pl):
    """x (N, H, W, C), contiguous -> cols (N, OH, OW, KH, KW, C), zeros where a window leaves
    x; ``c`` is C, a constant where a caller below inlines this."""
    oh, ow, kh, kw = cols.shape[1], cols.shape[2], cols.shape[3], cols.shape[4]
    for i in range(x.shape[0]):
        _image_columns(x, i, cols[i].reshape(oh * ow * kh * kw * c), oh, ow, kh, kw, c, sh, sw, dh, dw, pt, pl)
    return cols


# im2col for 2, 3 (an image's channels: 1.6-1.9x faster than for any C) and 4 channels
def _im2col_2(x, cols, sh, sw, dh, dw, pt, pl):
    return _im2col(x, cols, 2, sh, sw, dh, dw, pt, pl)


def _im2col_3(x, cols, sh, sw, dh, dw, pt, pl):
    return _im2col(x, cols, 3, sh, sw, dh, dw, pt, pl)


def _im2col_4(x, cols, sh, sw, dh, dw, pt, pl):
    return _im2col(x, cols, 4, sh, sw, dh, dw, pt, pl)


def _im2col_any(x, cols, sh, sw, dh, dw, pt, pl):
    return _im2col(x, cols, x.shape[3], sh, sw, dh, dw, pt, pl)


def _conv_images(x, wm, bt, act, out, kh, kw, c, sh, sw, dh, dw, pt, pl):
    """:func:`conv_images`' loop: per image, its columns into a buffer of one image (in
    cache), their product with ``wm`` (KH x KW x C, F) into the image's output (BLAS through
    numba's ``np.dot``), then the tiled bias ``bt`` (empty: none) and ``act`` on it
    (:func:`_bias_act`) while it is in cache."""
    oh, ow, f = out.shape[1], out.shape[2], out.shape[3]
    rows, k = oh * ow, kh * kw * c
    cols = np.empty((rows, k), dtype=x.dtype)
    flat = cols.reshape(rows * k)
    for i in range(x.shape[0]):
        _image_columns(x, i, flat, oh, ow, kh, kw, c, sh, sw, dh, dw, pt, pl)
        o = out[i].reshape(rows, f)
        np.dot(cols, wm, o)
        if bt.shape[0]:
            _bias_act(o, bt, act)
    return out


# by image for a 3x3 window of 1 to 4 channels (its window rows' copies unrolled: the columns
# of a 3-channel stem 1.7x faster than with KW and C variables), and for any other
def _conv_images_3x3_1(x, wm, bt, act, out, sh, sw, dh, dw, pt, pl):
    return _conv_images(x, wm, bt, act, out, 3, 3, 1, sh, sw, dh, dw, pt, pl)


def _conv_images_3x3_2(x, wm, bt, act, out, sh, sw, dh, dw, pt, pl):
    return _conv_images(x, wm, bt, act, out, 3, 3, 2, sh, sw, dh, dw, pt, pl)


def _conv_images_3x3_3(x, wm, bt, act, out, sh, sw, dh, dw, pt, pl):
    return _conv_images(x, wm, bt, act, out, 3, 3, 3, sh, sw, dh, dw, pt, pl)


def _conv_images_3x3_4(x, wm, bt, act, out, sh, sw, dh, dw, pt, pl):
    return _conv_images(x, wm, bt, act, out, 3, 3, 4, sh, sw, dh, dw, pt, pl)


def _conv_images_any(x, wm, bt, act, out, kh, kw, sh, sw, dh, dw, pt, pl):
    return _conv_images(x, wm, bt, act, out, kh, kw, x.shape[3], sh, sw, dh, dw, pt, pl)


def _winograd_tiles(p, v, th, tw):
    """Winograd F(2x2, 3x3)'s input transform: the 4x4 tile d of the padded channels-last
    input ``p`` (N, 2TH + 2, 2TW + 2, C) at every even row and column becomes B^T d B, its
    16 values written to ``v`` (N x TH x TW, 16, C): tile-major, a tile's 16 rows of C
    contiguous (16 rows a whole matrix apart fell into the same cache sets: 3-4x slower).
    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]: additions only."""
    n, c = p.shape[0], p.shape[3]
    for i in range(n):
        for ty in range(th):
            r0, r1, r2, r3 = p[i, 2 * ty], p[i, 2 * ty + 1], p[i, 2 * ty + 2], p[i, 2 * ty + 3]
            for tx in range(tw):
                vt = v[(i * th + ty) * tw + tx]
                x = 2 * tx
                # rows, not computed indices: numba checks those for wraparound (no SIMD)
                d00, d01, d02, d03 = r0[x], r0[x + 1], r0[x + 2], r0[x + 3]
                d10, d11, d12, d13 = r1[x], r1[x + 1], r1[x + 2], r1[x + 3]
                d20, d21, d22, d23 = r2[x], r2[x + 1], r2[x + 2], r2[x + 3]
                d30, d31, d32, d33 = r3[x], r3[x + 1], r3[x + 2], r3[x + 3]
                v0, v1, v2, v3, v4, v5, v6, v7 = vt[0], vt[1], vt[2], vt[3], vt[4], vt[5], vt[6], vt[7]
                v8, v9, v10, v11, v12, v13, v14, v15 = vt[8], vt[9], vt[10], vt[11], vt[12], vt[13], vt[14], vt[15]
                for cc in range(c):
                    a0, a1, a2, a3 = d00[cc] - d20[cc], d01[cc] - d21[cc], d02[cc] - d22[cc], d03[cc] - d23[cc]
                    b0, b1, b2, b3 = d10[cc] + d20[cc], d11[cc] + d21[cc], d12[cc] + d22[cc], d13[cc] + d23[cc]
                    e0, e1, e2, e3 = d20[cc] - d10[cc], d21[cc] - d11[cc], d22[cc] - d12[cc], d23[cc] - d13[cc]
                    f0, f1, f2, f3 = d10[cc] - d30[cc], d11[cc] - d31[cc], d12[cc] - d32[cc], d13[cc] - d33[cc]
                    v0[cc], v1[cc], v2[cc], v3[cc] = a0 - a2, a1 + a2, a2 - a1, a1 - a3
                    v4[cc], v5[cc], v6[cc], v7[cc] = b0 - b2, b1 + b2, b2 - b1, b1 - b3
                    v8[cc], v9[cc], v10[cc], v11[cc] = e0 - e2, e1 + e2, e2 - e1, e1 - e3
                    v12[cc], v13[cc], v14[cc], v15[cc] = f0 - f2, f1 + f2, f2 - f1, f1 - f3
    return v


def _winograd_untiles(m, b, y, th, tw):
    """Winograd F(2x2, 3x3)'s output transform: each tile's 16 products ``m`` (N x TH x TW,
    16, F; tile-major as :func:`_winograd_tiles` writes) become its 2x2 outputs A^T m A plus
    the bias ``b`` (F,), written to channels-last ``y`` (N, OH, OW, F) where they fall inside
    it (an odd OH or OW: the last tiles' second row or column is dropped).
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]."""
    n, oh, ow, f = y.shape
    s0, s1, s2, s3 = np.empty(f, dtype=y.dtype), np.empty(f, dtype=y.dtype), np.empty(f, dtype=y.dtype), \
        np.empty(f, dtype=y.dtype)         # the outputs of a tile at the edge
    for i in range(n):
        for ty in range(th):
            yy = 2 * ty
            for tx in range(tw):
                mt = m[(i * th + ty) * tw + tx]
                xx = 2 * tx
                m0, m1, m2, m3, m4, m5, m6, m7 = mt[0], mt[1], mt[2], mt[3], mt[4], mt[5], mt[6], mt[7]
                m8, m9, m10, m11, m12, m13, m14, m15 = mt[8], mt[9], mt[10], mt[11], mt[12], mt[13], mt[14], mt[15]
                whole = yy + 1 < oh and xx + 1 < ow
                o0 = y[i, yy, xx] if whole else s0
                o1 = y[i, yy, xx + 1] if whole else s1
                o2 = y[i, yy + 1, xx] if whole else s2
                o3 = y[i, yy + 1, xx + 1] if whole else s3
                for k in range(f):
                    t0 = m0[k] + m4[k] + m8[k]
                    t1 = m1[k] + m5[k] + m9[k]
                    t2 = m2[k] + m6[k] + m10[k]
                    t3 = m3[k] + m7[k] + m11[k]
                    u0 = m4[k] - m8[k] - m12[k]
                    u1 = m5[k] - m9[k] - m13[k]
                    u2 = m6[k] - m10[k] - m14[k]
                    u3 = m7[k] - m11[k] - m15[k]
                    o0[k] = t0 + t1 + t2 + b[k]
                    o1[k] = t1 - t2 - t3 + b[k]
                    o2[k] = u0 + u1 + u2 + b[k]
                    o3[k] = u1 - u2 - u3 + b[k]
                if not whole:
                    y[i, yy, xx] = s0
                    if xx + 1 < ow:
                        y[i, yy, xx + 1] = s1
                    if yy + 1 < oh:
                        y[i, yy + 1, xx] = s2
    return y


def _max_pool(x, out, kh, kw, sh, sw, dh, dw, pt, pl):
    """x (N, H, W, C) -> out (N, OH, OW, C): the max over each window's elements inside x,
    taken in the window's row-major order as NumPy's fold of the offsets takes them (the
    same values, NaN included; which zero a tie of -0.0 and 0.0 keeps is unspecified, as
    in NumPy, whose SIMD and scalar loops differ there); -inf where a window holds none."""
    n, h, wd, c = x.shape
    oh, ow = out.shape[1], out.shape[2]
    acc = np.empty(c, dtype=out.dtype)
    for job in range(n * oh):
        i = job // oh
        y = job - i * oh
        for xo in range(ow):
            for cc in range(c):
                acc[cc] = -np.inf
            for p in range(kh):
                yi = y * sh - pt + p * dh
                if yi < 0 or yi >= h:
                    continue
                for q in range(kw):
                    xi = xo * sw - pl + q * dw
                    if xi < 0 or xi >= wd:
                        continue
                    for cc in range(c):
                        acc[cc] = _combine(acc[cc], x[i, yi, xi, cc], 0)
            for cc in range(c):
                out[i, y, xo, cc] = acc[cc]
    return out


def _reduce_tiles(x, out, how):
    """x (A, K1, B, K2, C) -> out (A, B, C): the max (how 0) or min (1) over K1 and K2, one
    output row (B, C) at a time (its inner loop over C vectorises), NaN kept as
    np.maximum/np.minimum keep it."""
    na, k1, nb, k2, c = x.shape
    for a in range(na):
        o = out[a]
        for b in range(nb):
            for cc in range(c):
                o[b, cc] = x[a, 0, b, 0, cc]
        for p in range(k1):
            for q in range(k2):
                if p == 0 and q == 0:
                    continue
                for b in range(nb):
                    for cc in range(c):
                        o[b, cc] = _combine(o[b, cc], x[a, p, b, q, cc], how)
    return out


def _combine(u, v, how):
    """np.maximum (how 0) or np.minimum (1) of two scalars: NaN from either side."""
    if how == 0:
        return u if (u >= v or u != u) else v
    return u if (u <= v or u != u) else v


# --------------------------------------------------------------------------- #
# Entry points (2-D, channels-last; callers check :func:`takes` first)
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=256)
def epilogue_codes(epilogue, dtype) -> np.ndarray:
    """The kernels' form of an activation epilogue: up to two (op, lo, hi) of
    :data:`_EPILOGUE_OPS` (Relu; Clip's bounds; CapAt's constant as lo), as six numbers
    (read-only, made once per epilogue and type, not per batch)."""
    e = np.zeros(6, dtype=dtype)
    for k, (op, *bounds) in enumerate(epilogue):
        e[3 * k] = _EPILOGUE_OPS[op]
        e[3 * k + 1:3 * k + 1 + len(bounds)] = bounds
    e.flags.writeable = False
    return e


def depthwise(xl, w, b, kernel, strides, dil, pads, out, epilogue=()):
    """Depthwise conv of channels-last ``xl`` (N, H, W, C) with ONNX weights (C x M, 1, KH,
    KW): M output channels per input channel (M > 1, a channel multiplier, only where
    :func:`depthwise_by_rows` says so); the bias (or None) added, then the ``epilogue``
    (at most two ops of :data:`_EPILOGUE_OPS` with their constants, as each value is
    stored: a fused ReLU6 costs no pass of its own). -> (N, OH, OW, C x M)."""
    xl = np.ascontiguousarray(xl)
    c, co = xl.shape[-1], w.shape[0]
    wk, bias, rows = _depthwise_forms(w, b, c, kernel, strides, out, xl.dtype)
    y = np.empty((xl.shape[0],) + tuple(out) + (co,), dtype=xl.dtype)
    e = epilogue_codes(tuple(epilogue), xl.dtype)
    if rows:
        return _call("depthwise rows", xl, wk, bias, y, strides[0], dil[0], dil[1], pads[0], pads[1], e)
    if co != c:
        raise ValueError(f"a depthwise conv of {c} channels to {co} runs by rows only")
    return _call("depthwise", xl, wk, bias, y, strides[0], strides[1], dil[0], dil[1], pads[0], pads[1], e)


def _depthwise_forms(w, b, c, kernel, strides, out, dtype):
    """(weights, bias, by rows) of a depthwise conv of ``c`` input channels: the weights
    (KH, KW, C x M) for the per-pixel kernel, tiled to :data:`_ROW_RUN` values for the rows
    form (:func:`depthwise_by_rows`); the bias (zeros for None) of the type."""
    co = w.shape[0]
    wk = weight_form(w, f"depthwise {dtype.str}", lambda: np.ascontiguousarray(w.reshape(co, -1).T)
                     .reshape(tuple(kernel) + (co,)).astype(dtype, copy=False))
    bias = np.zeros(co, dtype) if b is None else np.ascontiguousarray(b, dtype=dtype)
    if depthwise_by_rows(c, co, kernel, strides, out[1]):
        return weight_form(w, f"depthwise rows {dtype.str}", lambda: np.tile(wk, (1, 1, max(1, _ROW_RUN // co)))), \
            bias, True
    return wk, bias, False


def expand_depthwise_fn(we, be, epilogue_e, w, b, kernel, strides, dil, pads, out, epilogue, wp, bp, dtype,
                        residual=False):
    """An inverted residual's expansion and depthwise conv, one image at a time, as a
    function of ``xl`` (N, H, W, C) channels-last of type ``dtype``, the forms of the
    weights and epilogues made once (a program's constants: 15-40 us a call, where the
    kernel of a late, 3x3 block of Keras MobileNetV2 takes 60). ``xl`` times ``we`` (C, CM:
    the 1x1 conv's weights, transposed; None: no expansion, the depthwise conv reads
    ``xl``) plus ``be`` (CM,), then ``epilogue_e``, goes into one image's buffer (in cache),
    which the depthwise conv (ONNX weights ``w`` (CM, 1, KH, KW), bias ``b``, ``epilogue``)
    reads at once: the expanded values (6x the input's) are never written to memory whole,
    nor read back. With ``wp`` (CM, CP: the projection's 1x1 weights, transposed; its bias
    ``bp`` or None), the depthwise conv's image goes to a second buffer, which it
    multiplies: those values stay in cache too; with ``residual``, plus ``xl`` (of the
    output's shape). The same operations on the same values as :func:`product_epilogue`
    (its products by blocks of rows: to rounding), :func:`depthwise` and a product. ->
    f(xl) -> (N, OH, OW, CM or CP)"""
    cm = w.shape[0]
    wk, bias, rows = _depthwise_forms(w, b, cm, kernel, strides, out, dtype)
    k = max(1, _TILE // cm)                        # expanded rows a row of the epilogue's loop
    expand = we is not None
    we, be = (we, be) if expand else (np.zeros((1, cm), dtype), np.zeros(cm, dtype))   # (no expansion: unread)
    project = wp is not None
    wp = np.ascontiguousarray(wp, dtype=dtype) if project else np.zeros((1, 1), dtype)
    cp = wp.shape[1]
    bpt = np.zeros(0, dtype) if bp is None else _tiled(bp, cp, max(1, _TILE // cp) * cp, dtype)   # empty: no bias
    consts = (np.ascontiguousarray(we, dtype=dtype), _tiled(be, cm, k * cm, dtype),
              epilogue_codes(tuple(epilogue_e), dtype), wk, bias)
    tail = (strides[0], strides[1], dil[0], dil[1], pads[0], pads[1], epilogue_codes(tuple(epilogue), dtype), rows,
            wp, project, bpt, epilogue_codes((), dtype), residual, expand)
    shape = tuple(out) + (cp if project else cm,)

    def run(xl):
        xl = np.ascontiguousarray(xl)
        y = np.empty((xl.shape[0],) + shape, dtype=dtype)
        _one_blas_thread()
        return _call("expand depthwise", xl, *consts, y, *tail)
    return run



def products_available() -> bool:
    """Whether the kernels that multiply matrices inside (:func:`expand_depthwise_fn`,
    :func:`conv_images`) run here: the compiled kernels, and SciPy's BLAS (numba's
    ``np.dot`` calls it)."""
    return available() and _scipy_blas() is not None


@functools.lru_cache(maxsize=1)
def _scipy_blas():
    """SciPy's BLAS loaded (numba's ``np.dot`` calls it): the controllers (threadpoolctl) of
    those of its libraries that are SciPy's own copy, not NumPy's (a wheel's under
    ``scipy.libs`` or ``scipy/.dylibs``; where both share one library, none: NumPy's thread
    limits then hold for it too); None where SciPy is not installed."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    def own(path) -> bool:
        parts = os.path.normpath(path).split(os.sep)
        return parts[-2:-1] == ["scipy.libs"] or parts[-3:-1] == ["scipy", ".dylibs"]
    return tuple(lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas" and own(lib.filepath))


def _one_blas_thread() -> None:
    """SciPy's own BLAS on the calling thread alone, at every fused call (a ctypes call:
    a process-wide setting anyone may change, a ``threadpool_limits`` block's exit
    included): the kernel runs on a block thread of `Program.run` or beside NumPy's BLAS
    threads, and a second pool of BLAS threads on the same cores made torchvision's
    MobileNetV2 10x slower. Only SciPy's own copy, which gpu-mdf's inference path calls
    nowhere else."""
    for lib in _scipy_blas() or ():
        if lib.num_threads != 1:
            lib.set_num_threads(1)


_ROW_RUN = 8192        # values of an output row the rows form takes at most (its weights' tile)


def depthwise_by_rows(c: int, co: int, kernel, strides, ow: int) -> bool:
    """Whether a depthwise conv of ``c`` channels to ``co`` (a multiple) runs as whole output
    rows (:func:`_depthwise_rows`): a horizontal stride of 1, a row of at most
    :data:`_ROW_RUN` values (the weights' tile, one per dtype, not per width: KH x KW x
    _ROW_RUN values, so windows of at most 7x7's 49 offsets), and few
    channels where the per-pixel kernel is the other choice (measured, one thread: 3x3 at
    4-8 channels 1.25-1.35x faster, 12 1.08x; from 16 channels (a whole vector) the
    one-expression path is faster, 1.2-1.3x at 16, 1.5x at 32-48; other windows 1.1-1.5x up
    to 48 channels, slower at 64)."""
    if strides[1] != 1 or ow * co > _ROW_RUN or math.prod(kernel) > 49:
        return False
    return co != c or c < (16 if tuple(kernel) == (3, 3) else 49)


def im2col(xl, kernel, strides, dil, pads, out):
    """Columns (N, OH, OW, KH, KW, C) of channels-last ``xl`` (N, H, W, C), padding read as zeros."""
    xl = np.ascontiguousarray(xl)
    cols = np.empty((xl.shape[0],) + tuple(out) + tuple(kernel) + (xl.shape[-1],), dtype=xl.dtype)
    return _call("im2col", xl, cols, strides[0], strides[1], dil[0], dil[1], pads[0], pads[1])


def conv_images(xl, wm, b, epilogue, kernel, strides, dil, pads, out):
    """A 2-D convolution in one group of channels-last ``xl`` (N, H, W, C) with its im2col
    weights ``wm`` (KH x KW x C, F), plus the bias ``b`` (or None), then the ``epilogue``
    (:data:`_EPILOGUE_OPS`), one image at a time (:func:`_conv_images`): an image's
    columns are written to a buffer and multiplied while they are in cache, the bias and
    activations added to its output while that is. For convs of a few input channels (an
    image's stem), whose columns are many short copies: a 3-channel 3x3 stem of stride 2 at
    96x96, 11 images, 0.33 ms where its planes and a product by blocks of rows took 0.63.
    The same operations as :func:`product_epilogue` on the products of the same columns, to
    rounding (OpenBLAS picks its kernel by a product's size). -> (N, OH, OW, F)"""
    xl = np.ascontiguousarray(xl)
    dtype, f = xl.dtype, wm.shape[1]
    y = np.empty((xl.shape[0],) + tuple(out) + (f,), dtype=dtype)
    bt = np.zeros(0, dtype) if b is None else _tiled(b, f, max(1, _TILE // f) * f, dtype)     # empty: no bias
    act = epilogue_codes(tuple(epilogue), dtype)
    wm = np.ascontiguousarray(wm, dtype=dtype)
    _one_blas_thread()
    if tuple(kernel) == (3, 3) and xl.shape[-1] <= 4:
        return _call(f"conv images 3x3 {xl.shape[-1]}", xl, wm, bt, act, y, strides[0], strides[1], dil[0], dil[1],
                     pads[0], pads[1])
    return _call("conv images", xl, wm, bt, act, y, kernel[0], kernel[1], strides[0], strides[1], dil[0], dil[1],
                 pads[0], pads[1])


#: a blocked conv's columns per block (:func:`conv_blocks`): about a core's L2 (1 MB here;
#: 0.5 and 2 MB measured the same)
CONV_BLOCK_BYTES = 1 << 20
#: ... and at least this many rows a block (OpenBLAS runs short products slower)
_CONV_BLOCK_ROWS = 256
#: columns smaller than this stay in the last-level cache whole: blocks do not pay
_CONV_BLOCKS_FROM = 12 << 20


def product_epilogue(cols, wt, b, epilogue):
    """``cols`` (rows, K) @ ``wt`` (K, F), plus the bias ``b`` (F,), then the ``epilogue``
    (:data:`_EPILOGUE_OPS`), a block of about :data:`CONV_BLOCK_BYTES` of output rows at a
    time, the bias and activations while the block is in cache: one pass over the output
    in memory where the product and a fused chain after it made three (a 1x1 conv's
    ReLU6). The chain's operations on each value; the products to rounding (OpenBLAS picks
    its kernel by a product's size). -> (rows, F)"""
    rows, f = cols.shape[0], wt.shape[1]
    y = np.empty((rows, f), dtype=np.result_type(cols.dtype, wt.dtype))
    k = max(1, _TILE // f)                        # output rows a row of the epilogue's loop
    row = _tiled(b, f, k * f, y.dtype)            # the bias tiled (kept for a constant)
    act = epilogue_codes(tuple(epilogue), y.dtype)
    step = -(-max(_CONV_BLOCK_ROWS, CONV_BLOCK_BYTES // (f * y.itemsize)) // k) * k
    kernel = _load()["bias act"]
    for lo in range(0, rows, step):
        block = y[lo:lo + step]
        np.matmul(cols[lo:lo + step], wt, out=block)
        kernel(block, row, act)
    return y


def conv_by_blocks(c: int, window: int, f: int, rows: int, itemsize: int) -> bool:
    """Whether a 2-D conv (one group) of ``c`` channels, ``window`` offsets, ``f`` filters
    and ``rows`` output positions runs by blocks (:func:`conv_blocks`): where its columns
    are larger than :data:`_CONV_BLOCKS_FROM`, its weights small beside a block (OpenBLAS
    packs them again for every block's product) and its input has 8 channels or more.
    Measured, one thread, on the blocks `Program.run` makes: 64 channels at 56x56 (3
    images: 21 MB of columns) 1.16-1.2x, ResNet18 as a whole 1.06x; 32 at 112x112 1.9x;
    MNIST's 16 -> 32 at 14x14 (79 images: 6.5 MB) 1.0x and two threads 0.95x; a 3-channel
    stem 0.9-0.99x (its im2col is slow by its many short stores, not by memory); 256
    channels at 14x14 0.92x and 512 at 7x7 0.76x (their weights: 2.4 and 9.4 MB)."""
    k = window * c
    return c >= 8 and k * f * itemsize * 4 <= CONV_BLOCK_BYTES and rows * k * itemsize >= _CONV_BLOCKS_FROM


def conv_blocks(xl, wm, kernel, strides, dil, pads, out):
    """A 2-D convolution in one group of channels-last ``xl`` (N, H, W, C) with its im2col
    weights ``wm`` (KH x KW x C, F) -> (N, OH, OW, F), no bias: the columns of a block
    (about :data:`CONV_BLOCK_BYTES`: whole images where one image's columns are smaller,
    else a run of one image's output rows) written to one buffer and multiplied while they
    are in cache, where :func:`im2col` writes all of them (tens of MB) to memory and the
    product reads them back. The dot products of one GEMM over all the columns, to
    rounding (OpenBLAS picks its kernel by a product's size: float32 results differ from
    the whole product's in the last bits)."""
    xl = np.ascontiguousarray(xl)
    n, c = xl.shape[0], xl.shape[-1]
    (oh, ow), (kh, kw), (sh, sw), (dh, dw) = out, kernel, strides, dil
    k, f = wm.shape
    y = np.empty((n, oh, ow, f), dtype=xl.dtype)
    row = ow * k * xl.itemsize                                 # an output row's columns, in bytes
    by = min(oh, max(-(-_CONV_BLOCK_ROWS // ow), CONV_BLOCK_BYTES // row))
    images = max(1, CONV_BLOCK_BYTES // (oh * row)) if by == oh else 1
    buf = np.empty(images * by * ow * k, dtype=xl.dtype)
    rows = y.reshape(n * oh * ow, f)                          # a view: y is new
    for i in range(0, n, images):
        j = min(n, i + images)
        for y0 in range(0, oh, by):
            y1 = min(oh, y0 + by)
            # output rows y0.. read input rows from y0 x sh - the top padding on
            cols = buf[:(j - i) * (y1 - y0) * ow * k].reshape(j - i, y1 - y0, ow, kh, kw, c)
            _call("im2col", xl[i:j], cols, sh, sw, dh, dw, pads[0] - y0 * sh, pads[1])
            np.matmul(cols.reshape(-1, k), wm, out=rows[(i * oh + y0) * ow:((j - 1) * oh + y1) * ow])
    return y


#: Winograd's F(2x2, 3x3) for a batch of at least this many 4x4 tiles (2x2 outputs) only:
#: its 16 GEMMs of (tiles x C) x (C x F) are small, and OpenBLAS runs small ones at 40-50
#: GFLOP/s against 70 for im2col's one large GEMM (measured, one thread: 98 tiles 0.94-0.98x
#: im2col, 147-588 tiles 1.15-1.45x)
WINOGRAD_MIN_TILES = 128

#: Winograd's F(2x2, 3x3) weight transform G (4 x 3): the filter g becomes G g G^T
_WINOGRAD_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def winograd(xl, w, b, pads, out):
    """A 3x3 convolution of stride and dilation 1 in one group of channels-last ``xl`` (N,
    H, W, C) with ONNX weights ``w`` (F, C, 3, 3), the bias (or None) added, as Winograd's
    F(2x2, 3x3) (Lavin and Gray, 2016): each 2x2 block of outputs from a 4x4 tile of the
    input (a zero-padded copy) by 16 products of C values where the direct form makes 36,
    the 16 made as 16 GEMMs (tiles x C) x (C x F) by BLAS. Exact arithmetic gives the
    convolution; in floating point the transforms add a few roundings (measured against
    ONNX Runtime: 5e-7 x max|y| in float32, as im2col's). -> (N, OH, OW, F)."""
    n, h, wd, c = xl.shape
    f = w.shape[0]
    pt, pl = pads[0], pads[1]
    th, tw = -(-out[0] // 2), -(-out[1] // 2)
    u = weight_form(w, f"winograd {xl.dtype}", lambda: np.ascontiguousarray(
        np.einsum("ak,fckl,bl->abcf", _WINOGRAD_G, w.astype(np.float64), _WINOGRAD_G)
        .reshape(16, c, f).astype(xl.dtype)))
    p = np.zeros((n, 2 * th + 2, 2 * tw + 2, c), dtype=xl.dtype)   # OH + 2 >= H + pads: x fits
    p[:, pt:pt + h, pl:pl + wd] = xl
    v = _call("winograd tiles", p, np.empty((n * th * tw, 16, c), dtype=xl.dtype), th, tw)
    del p
    m = np.empty((n * th * tw, 16, f), dtype=xl.dtype)
    with np.errstate(invalid="ignore", over="ignore"):      # a NaN or inf: nn.conv takes the direct form then
        np.matmul(v.transpose(1, 0, 2), u, out=m.transpose(1, 0, 2))
    del v
    # no bias: -0.0, which adds nothing (x + -0.0 is x, a zero's sign too)
    bias = np.full(f, -0.0, dtype=xl.dtype) if b is None else np.ascontiguousarray(b, dtype=xl.dtype)
    y = np.empty((n,) + tuple(out) + (f,), dtype=xl.dtype)
    return _call("winograd untiles", m, bias, y, th, tw)


def max_pool(xl, kernel, strides, dil, pads, out):
    """2-D max pooling of channels-last ``xl`` (N, H, W, C), the window's elements outside
    ``xl`` skipped (ONNX MaxPool's padding and ceil_mode overhang). -> (N, OH, OW, C)."""
    xl = np.ascontiguousarray(xl)
    y = np.empty((xl.shape[0],) + tuple(out) + (xl.shape[-1],), dtype=xl.dtype)
    return _call("max_pool", xl, y, kernel[0], kernel[1], strides[0], strides[1], dil[0], dil[1], pads[0], pads[1])


_HOW = {"max": 0, "min": 1}


def reduce_tiles(x, axes, how: str):
    """``how`` ("max" or "min") of C-contiguous ``x`` over one or two of its axes
    (sorted), the others kept in order, as a new array without the reduced axes; None where
    this does not apply (other layouts, more axes, fewer than 8 values a row inside the last
    reduced axis: NumPy's fold is as fast there)."""
    if not isinstance(x, np.ndarray) or not x.flags.c_contiguous or len(axes) not in (1, 2) \
            or not takes(x.dtype):
        return None
    d = x.shape
    a1, a2 = axes[0], axes[-1]
    inner = math.prod(d[a2 + 1:])
    if inner < 8:
        return None
    if len(axes) == 1:
        shape5 = (math.prod(d[:a1]), d[a1], 1, 1, inner)
    else:
        shape5 = (math.prod(d[:a1]), d[a1], math.prod(d[a1 + 1:a2]), d[a2], inner)
    out = np.empty((shape5[0], shape5[2], inner), dtype=x.dtype)
    _call("reduce_tiles", x.reshape(shape5), out, _HOW[how])
    return out.reshape(tuple(n for i, n in enumerate(d) if i not in axes))


@dataclass
class Chain:
    """A fused chain compiled, each form on first use: a ufunc (any broadcasting and
    strides), and loops over rows of contiguous values, one for each set of operands that
    are whole tensors (the others are per-channel rows or scalars)."""
    program: tuple
    dtype: np.dtype
    _ufunc: object = None
    _rows: dict = field(default_factory=dict)

    def ufunc(self, *ops, **kw):
        if self._ufunc is None:
            self._ufunc = _compile_chain(self.program, self.dtype)
        return self._ufunc(*ops, **kw)

    def rows(self, full: frozenset, *ops):
        kernel = self._rows.get(full)
        if kernel is None:
            kernel = self._rows[full] = _compile_chain(self.program, self.dtype, full)
        return kernel(*ops)


def fused(program, dtype) -> Chain:
    """The chain ``program`` over operands of type ``dtype``, compiled (once a process)."""
    key = (program, np.dtype(dtype))
    chain = _chains.get(key)
    if chain is None:
        with _chains_lock:
            chain = _chains.setdefault(key, Chain(program, np.dtype(dtype)))
    return chain


def _compile_chain(program, dtype, full: frozenset | None = None):
    """numba's ufunc of the chain or, given ``full``, its row loop; compiled in memory
    (0.1-0.2 s each; numba's disk cache needs a source file and would save half of that)."""
    import math

    import numba

    from .fusion import n_operands, py_chain, py_rows
    with _chains_lock:
        if full is not None:
            source, consts = py_rows(program, full, dtype)
        else:
            source, consts = py_chain(program, dtype)
        # the text holds the fusion table's templates and generated names only (attribute
        # values are the namespace's constants): nothing of a model's files is run, and
        # _generated_only refuses any other text before it is
        _generated_only(source, consts)
        namespace = {"T": dtype.type, "math": math, "np": np, **_chain_functions(numba), **consts}
        exec(source, namespace)       # noqa: S102
        if full is not None:
            return numba.njit(nogil=True, error_model="numpy")(namespace["rows"])
        t = numba.from_dtype(dtype)
        return numba.vectorize([t(*([t] * n_operands(program)))], nopython=True)(namespace["chain"])


_GENERATED_NAME = re.compile(r"(x|r)\d+|c\d+_[a-z]+|T|math|np|out|row|i|j|range|abs|chain|rows|tanh32|exp32|sigmoid32")
_ATTRIBUTES = frozenset({"sqrt", "empty", "shape", "dtype"})
_SYNTAX = (ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Assign, ast.Return, ast.For, ast.Name,
           ast.Load, ast.Store, ast.Attribute, ast.Subscript, ast.Tuple, ast.Call, ast.Constant, ast.BinOp,
           ast.UnaryOp, ast.Compare, ast.IfExp, ast.operator, ast.unaryop, ast.cmpop)


def _generated_only(source: str, consts: dict) -> None:
    """Refuse (ValueError) a chain's source unless it is what the generator writes: names it
    makes (operands, results, attribute constants, loop indices), ``T``/``math``/``np``,
    numbers, arithmetic, comparisons and loops; no string, no other name or attribute."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, _SYNTAX) or (
                isinstance(node, ast.Constant) and type(node.value) not in (int, float)) or (
                isinstance(node, ast.Attribute) and node.attr not in _ATTRIBUTES) or (
                isinstance(node, (ast.Name, ast.arg)) and not _GENERATED_NAME.fullmatch(
                    node.id if isinstance(node, ast.Name) else node.arg)) or (
                isinstance(node, ast.FunctionDef) and node.name not in ("chain", "rows")):
            raise ValueError(f"a fused chain's generated source holds {ast.dump(node)[:80]}: refused")
    if not all(_GENERATED_NAME.fullmatch(k) and isinstance(v, float) for k, v in consts.items()):
        raise ValueError("a fused chain's constants are not the generator's: refused")


def run_segments(segs: list, chains: list, ops: list, inplace: bool, dtype):
    """A fused chain cut into segments (:func:`~gpu_mdf.engine.ops.fusion.segments`): each
    compiled piece through :func:`run_chain`, each op without a compiled form (exp, tanh, sigmoid)
    by NumPy in place on the value so far. Into ``ops[0]`` where ``inplace`` allows."""
    value = None                                           # the value so far
    for seg, chain in zip(segs, chains):
        if seg.op:
            src = value if value is not None else ops[seg.operands[0]]
            dest = value if value is not None else src if inplace else np.empty_like(src)
            r = FUSIBLE[seg.op].numpy(src, None, dest, dict(seg.attrs))
            if r is not dest:
                np.copyto(dest, r)
            value = dest
            continue
        sub = [value if r == PREV else ops[r] if isinstance(r, int) else np.asarray(r, dtype) for r in seg.operands]
        value = run_chain(chain, sub, inplace or value is not None)
    return value


_TILE = 4096            # elements an inner loop of a compiled chain runs over, about


def run_chain(chain: Chain, ops: list, inplace: bool):
    """Run a compiled chain on ``ops`` (the chain's input first), into the input where
    ``inplace`` and the shapes allow. Where the input is one contiguous block of memory and
    every other operand is a tensor laid out the same (a residual), a per-channel row over
    its innermost axis (a bias or scale over channels-last values) or a scalar, it runs as
    rows of about 4,096 values, rows and scalars tiled to a row, through the chain's row
    loop; otherwise through its ufunc."""
    x = ops[0]
    flat = _rows(x, ops[1:])
    if flat is None:
        if inplace and all(o.shape == x.shape or broadcast_shape(x.shape, o.shape) == x.shape for o in ops[1:]):
            return chain.ufunc(*ops, out=x)
        return chain.ufunc(*ops)
    rows, c, k, order, full = flat
    n, width = rows // k, k * c
    out = x if inplace else np.empty_like(x)         # empty_like keeps x's memory order
    tiled = [_flat_view(o, order, n, width) if i in full else _tiled(o, c, width, x.dtype)
             for i, o in enumerate(ops[1:], start=1)]
    chain.rows(full, _flat_view(x, order, n, width), *tiled, _flat_view(out, order, n, width))
    return out


def _tiled(o, c: int, width: int, dtype):
    """A per-channel operand (c values) repeated to a row of ``width`` (a multiple of c, at
    most max(c, _TILE)), or a scalar of any rank filled to one: the start of one long row
    made once for a constant (:func:`~gpu_mdf.engine.ops.weight_form`), whatever the batch
    size (a fill per call was 10 us, a chain of MobileNetV2 at batch 1 20-70 us)."""
    if np.ndim(o) and o.size == c:
        return weight_form(o, "row", lambda: np.tile(o.reshape(-1), -(-max(c, _TILE) // c)))[:width]
    n = max(c, _TILE)
    return weight_form(o, f"filled {n} {np.dtype(dtype).str}", lambda: np.full(n, np.reshape(o, -1)[0], dtype))[:width]


_ROWS: dict = {}


def _rows(x, others):
    """(rows, C, k, order, full) where ``x`` is contiguous in its own memory ``order`` (axes,
    the innermost last), every other operand either a whole tensor laid out as ``x`` (its
    index in ``full``, counting ``x`` as 0) or varying along that innermost axis only (or
    nowhere), and ``k`` rows of its C values make a tile; None otherwise. Kept by the
    operands' shapes, strides and kinds (it is theirs alone): a batch's chain works it out once."""
    if not isinstance(x, np.ndarray) or x.ndim < 2 or x.size < 2 * _TILE:
        return None
    key = (x.shape, x.strides, x.itemsize) + tuple(
        (o.shape, o.strides, o.itemsize) if isinstance(o, np.ndarray) else
        np.generic if isinstance(o, np.generic) else type(o) for o in others)
    return remembered(_ROWS, key, lambda: _find_rows(x, others))


def _find_rows(x, others):
    # size-1 axes first (their strides mean nothing), then the others by falling stride
    order = tuple(sorted(range(x.ndim), key=lambda i: (x.shape[i] != 1, -x.strides[i])))
    axis = order[-1]
    c = x.shape[axis]
    if x.strides[axis] != x.itemsize or not np.transpose(x, order).flags.c_contiguous:
        return None
    full = set()
    for k, o in enumerate(others, start=1):
        if isinstance(o, np.generic):
            continue                                           # a NumPy scalar
        if not isinstance(o, np.ndarray) or o.ndim > x.ndim:
            return None
        if o.shape == x.shape and np.transpose(o, order).flags.c_contiguous:
            full.add(k)                                        # laid out as x
            continue
        shape = (1,) * (x.ndim - o.ndim) + o.shape
        if any(n != 1 for i, n in enumerate(shape) if i != axis) or shape[axis] not in (1, c):
            return None
    rows = x.size // c
    return rows, c, _tile_rows(rows, c), order, frozenset(full)


_TILE_ROWS: dict = {}


def _tile_rows(rows: int, c: int) -> int:
    """The largest divisor of ``rows`` with at most about _TILE values in k rows (remembered)."""
    def largest():
        k = max(1, min(rows, _TILE // c))
        while rows % k:
            k -= 1
        return k
    return remembered(_TILE_ROWS, (rows, c), largest)


def _flat_view(x, order, n: int, width: int):
    """x's memory as (n, width), through its memory order (a view)."""
    return x.transpose(order).reshape(n, width)
