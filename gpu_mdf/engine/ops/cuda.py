"""Generated CUDA kernels, as ``cupy.ElementwiseKernel``\\ s, one per source and array
module (CuPy compiles each once and caches the binary on disk):

* :func:`fused`: a fused elementwise chain (:mod:`~gpu_mdf.engine.ops.fusion`) in one
  pass over memory;
* :func:`row_softmax`: softmax or log-softmax over the last axis, after a fused chain,
  one thread per row;
* :func:`im2col`: a convolution's columns with the padding in the index arithmetic (no
  padded copy of the input);
* :func:`depthwise`: a depthwise convolution, one output element per thread.

The bodies are plain C (CUDA's math library, ``ptrdiff_t``, raw arrays indexed by a flat
C-order index, the element index ``i``), so the tests compile every source written here to
PTX with nvcc, and the strict CuPy stand-in runs them on the host through a C compiler.
:data:`SOURCES` records every source generated in this process, for those tests.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .fusion import KERNEL_DTYPES, Instr, c_chain, n_operands

_KERNELS: dict = {}
SOURCES: dict[str, tuple[str, str, str]] = {}      # kernel name -> (in_params, out_params, body)


def kernel(xp, kind: str, in_params: str, out_params: str, body: str):
    """The ElementwiseKernel of this source, built once per array module."""
    key = (id(xp), in_params, out_params, body)
    k = _KERNELS.get(key)
    if k is None:
        digest = hashlib.sha1("\n".join((in_params, out_params, body)).encode()).hexdigest()[:12]
        name = f"gpu_mdf_{kind}_{digest}"
        SOURCES[name] = (in_params, out_params, body)
        k = _KERNELS[key] = xp.ElementwiseKernel(in_params, out_params, body, name)
    return k


def _suffix(dtype) -> str:
    dt = np.dtype(dtype)
    if dt not in KERNEL_DTYPES:
        raise ValueError(f"generated kernels take float32 or float64, not {dt}")
    return "f" if dt == np.float32 else ""


def fused_source(program: tuple[Instr, ...], dtype) -> tuple[str, str, str]:
    """(in_params, out_params, body) of a fused chain over operands ``x0, x1...`` of type ``T``."""
    lines = c_chain(program, lambda k: f"x{k}", _suffix(dtype))
    lines.append(f"y = r{len(program) - 1};")
    return ", ".join(f"T x{k}" for k in range(n_operands(program))), "T y", " ".join(lines)


def fused(xp, program: tuple[Instr, ...], dtype):
    return kernel(xp, "fused", *fused_source(program, dtype))


ROW_INDEX = {"full": "x{k}[o + j]", "row": "x{k}[j]", "scalar": "x{k}[0]"}


def row_source(program: tuple[Instr, ...], kinds: tuple[str, ...], tail: str, dtype) -> tuple[str, str, str]:
    """Softmax or log-softmax over rows of ``C`` values, each value the chain over the
    operands, read as ``kinds`` says: ``full`` (the output's shape), ``row`` (one value per
    column) or ``scalar``. A NaN anywhere in a row makes the row NaN, as in NumPy."""
    f = _suffix(dtype)
    if program:
        chain = " ".join(c_chain(program, lambda k: ROW_INDEX[kinds[k]].format(k=k), f))
        value = f"r{len(program) - 1}"
    else:
        chain, value = "", ROW_INDEX[kinds[0]].format(k=0)
    loop = "for (ptrdiff_t j = 0; j < C; ++j) {{ {chain} T v = {value}; {what} }}"

    def over_row(what):
        return loop.format(chain=chain, value=value, what=what)
    body = ["const ptrdiff_t o = (ptrdiff_t)i * C;", "T m = (T)0;",
            over_row("if (m == m && (j == 0 || !(v <= m))) m = v;"), "T s = (T)0;"]
    if tail == "softmax":
        body += [over_row(f"T e = exp{f}(v - m); y[o + j] = e; s += e;"),
                 "for (ptrdiff_t j = 0; j < C; ++j) y[o + j] = y[o + j] / s;"]
    elif tail == "logsoftmax":
        body += [over_row(f"T d = v - m; y[o + j] = d; s += exp{f}(d);"), f"const T ls = log{f}(s);",
                 "for (ptrdiff_t j = 0; j < C; ++j) y[o + j] = y[o + j] - ls;"]
    else:
        raise ValueError(f"row kernel tail {tail!r}")
    ins = ", ".join([f"raw T x{k}" for k in range(len(kinds))] + ["int64 C"])
    return ins, "raw T y", " ".join(body)


def row_softmax(xp, program, kinds, tail, operands, out):
    """Run the row kernel: ``out`` (C-contiguous, rows x C) gets the result."""
    k = kernel(xp, "row", *row_source(program, kinds, tail, out.dtype))
    c = out.shape[-1]
    rows = out.size // c if c else 0
    k(*operands, c, out, size=rows)
    return out


_WINDOW = ("int64 H, int64 W, int64 C, int64 OH, int64 OW, int64 KH, int64 KW, int64 SH, int64 SW, "
           "int64 DH, int64 DW, int64 PT, int64 PL")

IM2COL = (
    "raw T x, " + _WINDOW, "T y",
    "const ptrdiff_t K = KH * KW * C; const ptrdiff_t r = i / K; const ptrdiff_t k = i - r * K; "
    "const ptrdiff_t kw = k % KW; const ptrdiff_t kk = k / KW; "
    "const ptrdiff_t kh = kk % KH; const ptrdiff_t c = kk / KH; "
    "const ptrdiff_t ow = r % OW; const ptrdiff_t t = r / OW; const ptrdiff_t oh = t % OH; const ptrdiff_t n = t / OH; "
    "const ptrdiff_t h = oh * SH - PT + kh * DH; const ptrdiff_t w = ow * SW - PL + kw * DW; "
    "y = (h >= 0 && h < H && w >= 0 && w < W) ? x[((n * H + h) * W + w) * C + c] : (T)0;")


def _window_args(x_shape, out, kernel_, strides, dil, pads):
    n, h, w, c = x_shape
    return (h, w, c, out[0], out[1], kernel_[0], kernel_[1], strides[0], strides[1], dil[0], dil[1], pads[0], pads[1])


def im2col(xp, xl, kernel_, strides, dil, pads, out):
    """Columns (N * OH * OW, C * KH * KW) of an unpadded channels-last (N, H, W, C) input, in
    the order of ONNX's weights (F, C, KH, KW): the GEMM reads them as a free view."""
    n, c = xl.shape[0], xl.shape[-1]
    cols = xp.empty((n * out[0] * out[1], kernel_[0] * kernel_[1] * c), dtype=xl.dtype)
    kernel(xp, "im2col", *IM2COL)(xl, *_window_args(xl.shape, out, kernel_, strides, dil, pads), cols)
    return cols


DEPTHWISE = (
    "raw T x, raw T wt, int64 M, " + _WINDOW, "T y",
    "const ptrdiff_t CO = C * M; const ptrdiff_t co = i % CO; ptrdiff_t r = i / CO; "
    "const ptrdiff_t ow = r % OW; r /= OW; const ptrdiff_t oh = r % OH; const ptrdiff_t n = r / OH; "
    "const ptrdiff_t c = co / M; T acc = (T)0; "
    "for (ptrdiff_t kh = 0; kh < KH; ++kh) { const ptrdiff_t h = oh * SH - PT + kh * DH; "
    "if (h < 0 || h >= H) continue; "
    "for (ptrdiff_t kw = 0; kw < KW; ++kw) { const ptrdiff_t w = ow * SW - PL + kw * DW; "
    "if (w < 0 || w >= W) continue; "
    "acc += x[((n * H + h) * W + w) * C + c] * wt[(co * KH + kh) * KW + kw]; } } "
    "y = acc;")


def depthwise(xp, xl, w, m, kernel_, strides, dil, pads, out):
    """Depthwise convolution of an unpadded channels-last (N, H, W, C) input with weights
    (C * m, 1, KH, KW): (N, OH, OW, C * m)."""
    n, c = xl.shape[0], xl.shape[-1]
    y = xp.empty((n, out[0], out[1], c * m), dtype=xl.dtype)
    kernel(xp, "depthwise", *DEPTHWISE)(xl, w, m, *_window_args(xl.shape, out, kernel_, strides, dil, pads), y)
    return y


__all__ = ["SOURCES", "kernel", "fused", "fused_source", "row_softmax", "row_source", "im2col", "depthwise",
           "IM2COL", "DEPTHWISE"]
