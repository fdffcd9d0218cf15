"""Neural-network ops: products, convolution, pooling, normalisation, softmax, resizing.

Convolutions are computed channels-last: the input is viewed as (N, *spatial, C), so
an ONNX (NCHW) graph whose tensors already live channels-last in memory (what these
kernels return, and what a Keras graph's transposes give) pays no copies between
layers. Windows are built with ``as_strided`` from host-side shapes and strides
(CuPy's ``sliding_window_view`` synchronises with the device on every call), and
pooling is a max or sum over kernel-many strided slices.
"""

from __future__ import annotations

import math

import numpy as np

from . import (
    FLOAT,
    INT,
    INTS,
    STRING,
    Attr,
    OpError,
    check_alloc,
    cpu,
    device_const,
    norm_axis,
    op,
    remembered,
    scalar,
    weight_form,
)
from .elementwise import add_trailing


# --------------------------------------------------------------------------- #
# Products
# --------------------------------------------------------------------------- #
@op("onnx::MatMul", ("A", "B"), fresh=True)
def matmul(xp, a, b):
    """A stack of rows times one matrix (a Linear layer on (N, H, W, C) or (N, T, C)) is one
    2-D GEMM over the rows made contiguous: NumPy's matmul of a strided stack (a permuted
    channels-last view, as ConvNeXt and Swin write) loops outside BLAS, 2x slower."""
    if a.ndim > 2 and b.ndim == 2 and a.dtype == b.dtype and a.dtype.kind == "f":
        rows = xp.ascontiguousarray(a).reshape(-1, a.shape[-1])
        return xp.matmul(rows, b).reshape(a.shape[:-1] + (b.shape[1],))
    return xp.matmul(a, b)


@op("onnx::Gemm", ("A", "B"), optional=("C",), fresh=True, since=7,
    attrs={"alpha": Attr(FLOAT, 1.0), "beta": Attr(FLOAT, 1.0), "transA": Attr(INT, 0), "transB": Attr(INT, 0)})
def gemm(xp, a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0, epilogue=()):  # noqa: N803 - ONNX names
    """ONNX Gemm. ``epilogue``: activations after C (the bias: :func:`~gpu_mdf.engine.passes.gemm_epilogue`),
    (op, constants...) each: with the product a block of rows at a time where the compiled
    CPU kernels run (``cpu.product_epilogue``), by their NumPy (or CuPy) forms elsewhere."""
    if a.ndim != 2 or b.ndim != 2:
        raise OpError(f"Gemm takes 2-d A and B, got ranks {a.ndim} and {b.ndim}")
    if epilogue and xp is np and cpu.takes(a.dtype) and a.dtype == b.dtype and alpha == beta == 1.0 \
            and c is not None and c.shape == (b.shape[0 if transB else 1],):
        bt = weight_form(b, "gemm transposed", lambda: np.ascontiguousarray(b.T)) if transB else b
        return cpu.product_epilogue(a.T if transA else a, bt, c, epilogue)
    y = xp.matmul(a.T if transA else a, b.T if transB else b)   # fresh: safe to update in place
    if alpha != 1.0:
        y *= y.dtype.type(alpha)
    if c is not None and beta != 0.0:
        if beta != 1.0:
            c = c * c.dtype.type(beta)
        y += c
    return _activations(xp, y, epilogue) if epilogue else y


# --------------------------------------------------------------------------- #
# Windows, padding and output sizes
# --------------------------------------------------------------------------- #
_AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


def _check_window_attrs(a):
    if a.get("auto_pad", "NOTSET") not in _AUTO_PADS:
        raise OpError(f"auto_pad {a['auto_pad']!r} (expected one of {', '.join(_AUTO_PADS)})")
    if a.get("ceil_mode", 0) not in (0, 1):
        raise OpError(f"ceil_mode {a['ceil_mode']} (expected 0 or 1)")


def _check_positive(what, **sizes) -> None:
    """Kernel sizes, strides and dilations are 1 or more (ONNX's); anything else is refused."""
    for name, values in sizes.items():
        if any(int(v) < 1 for v in values):
            raise OpError(f"{what}: {name} {list(values)} (each must be 1 or more)")


def _check_bias(what, b_shape, f) -> None:
    """A Conv's or ConvTranspose's bias (its shape, None for none) is one value per output
    channel (F,), as ONNX says."""
    if b_shape is not None and tuple(b_shape) != (f,):
        raise OpError(f"{what}: bias of shape {tuple(b_shape)} for {f} output channels (expected ({f},))")


def _window_params(in_sp, kernel, strides, dilations, pads, auto_pad, what):
    nsp = len(in_sp)
    kernel = tuple(kernel)
    strides = tuple(strides or (1,) * nsp)
    dilations = tuple(dilations or (1,) * nsp)
    if len(kernel) != nsp or len(strides) != nsp or len(dilations) != nsp:
        raise OpError(f"{what}: kernel_shape/strides/dilations do not match {nsp} spatial axes")
    _check_positive(what, kernel=kernel, strides=strides, dilations=dilations)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        before, after = [], []
        for n, k, s, d in zip(in_sp, kernel, strides, dilations):
            total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            small, big = total // 2, total - total // 2
            before.append(small if auto_pad == "SAME_UPPER" else big)
            after.append(big if auto_pad == "SAME_UPPER" else small)
        pads = tuple(before + after)
    elif auto_pad == "VALID" or not pads:
        pads = (0,) * (2 * nsp)
    pads = tuple(pads)
    if len(pads) != 2 * nsp:
        raise OpError(f"{what}: {len(pads)} pads for {nsp} spatial axes")
    if any(p < 0 for p in pads):
        raise OpError(f"{what}: negative pads {list(pads)} (ONNX's pads are 0 or more)")
    return kernel, strides, dilations, pads


def _out_sizes(in_sp, kernel, strides, dilations, pads, ceil_mode=0):
    nsp = len(in_sp)
    out, extra = [], []
    for i, (n, k, s, d) in enumerate(zip(in_sp, kernel, strides, dilations)):
        span = (k - 1) * d + 1
        total = n + pads[i] + pads[i + nsp]
        if ceil_mode:
            o = -(-(total - span) // s) + 1
            if (o - 1) * s >= n + pads[i]:       # the last window must start inside the input
                o -= 1
        else:
            o = (total - span) // s + 1
        if o < 1:
            raise OpError(f"window of {span} does not fit an axis of {n} with pads {pads[i]}+{pads[i + nsp]}")
        out.append(o)
        extra.append(max((o - 1) * s + span - total, 0))   # ceil_mode: windows past the end
    return out, extra


def _pad_spatial(xp, x, before, after, value, first=1):
    """Pad the spatial axes of ``x`` with a constant (sync-free): those of channels-last
    (N, *S, C), or with ``first=2`` those of NCHW (N, C, *S)."""
    if not any(before) and not any(after):
        return x
    axes = range(first, first + len(before))
    sizes = [x.shape[i] for i in axes]
    shape = x.shape[:first] + tuple(n + b + a for n, b, a in zip(sizes, before, after)) + x.shape[axes.stop:]
    check_alloc(shape)                       # pads are attributes: a file may make them huge
    out = xp.full(shape, value, dtype=x.dtype)
    out[(slice(None),) * first + tuple(slice(b, b + n) for b, n in zip(before, sizes))] = x
    return out


def _offset_slices(offset, dilations, strides, out):
    """Spatial slices picking, for every output position, the window element at ``offset``."""
    return tuple(slice(o * d, o * d + (m - 1) * s + 1, s) for o, d, s, m in zip(offset, dilations, strides, out))


def _windows(xp, xl, kernel, strides, dilations, out):
    """(N, *S, C) -> (N, *out, *kernel, C) strided view, built from host shapes/strides."""
    st = xl.strides
    nsp = len(kernel)
    shape = (xl.shape[0],) + tuple(out) + tuple(kernel) + (xl.shape[-1],)
    strides_ = (st[0],) + tuple(st[1 + i] * strides[i] for i in range(nsp)) \
        + tuple(st[1 + i] * dilations[i] for i in range(nsp)) + (st[-1],)
    return xp.lib.stride_tricks.as_strided(xl, shape=shape, strides=strides_)


def _im2col(xp, xl, kernel, strides, dil, out):
    """(N, *S, C) -> contiguous (N, *out, *kernel, C) columns. For a few channels, one
    strided copy per kernel offset (whole rows at a time: 5x faster at C=1 than copying
    the window view, whose innermost run is C values); otherwise a copy of the window
    view (its innermost runs of kernel_w * C values are long enough)."""
    n, c = xl.shape[0], xl.shape[-1]
    if c >= 8:
        return xp.ascontiguousarray(_windows(xp, xl, kernel, strides, dil, out))
    cols = xp.empty((n,) + tuple(out) + tuple(kernel) + (c,), dtype=xl.dtype)
    nsp = len(kernel)
    for offset in np.ndindex(*kernel):
        cols[(slice(None),) * (1 + nsp) + offset + (slice(None),)] = \
            xl[(slice(None),) + _offset_slices(offset, dil, strides, out) + (slice(None),)]
    return cols


def _channels_last(xp, x):
    """NC... -> N...C, a view (a transpose: moveaxis checks its arguments for 8 us a call)."""
    return x.transpose((0,) + tuple(range(2, x.ndim)) + (1,))


def _to_nchw(xp, yl):
    """N...C -> NC..., a view."""
    return yl.transpose((0, yl.ndim - 1) + tuple(range(1, yl.ndim - 1)))


# --------------------------------------------------------------------------- #
# Convolution
# --------------------------------------------------------------------------- #
_CONV_ATTRS = {"auto_pad": Attr(STRING, "NOTSET"), "dilations": Attr(INTS), "group": Attr(INT, 1),
               "kernel_shape": Attr(INTS), "pads": Attr(INTS), "strides": Attr(INTS)}


@op("onnx::Conv", ("X", "W"), optional=("B",), fresh=True, attrs=dict(_CONV_ATTRS), check=_check_window_attrs)
def conv(xp, x, w, b=None, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None,
         strides=None, winograd=False, epilogue=()):
    """ONNX Conv (NCHW in and out), computed channels-last; the result is an NCHW view
    of channels-last memory. ``winograd``: a 3x3 conv of stride and dilation 1 in one group
    runs as Winograd's F(2x2, 3x3) where the compiled CPU kernels run, on a batch of enough
    tiles (the optimising pass :func:`~gpu_mdf.engine.passes.winograd_convs` asks for it;
    never a file). ``epilogue``: activations after the bias, (op, constants...) each
    (:func:`~gpu_mdf.engine.passes.depthwise_epilogue`, ``pointwise_epilogue``): inside the
    compiled depthwise kernel, on each block of a 1x1 conv's output rows
    (``cpu.product_epilogue``), by their NumPy forms elsewhere."""
    y, activated = _conv(xp, x, w, b, auto_pad, dilations, group, kernel_shape, pads, strides, winograd, epilogue)
    return _activations(xp, y, epilogue) if epilogue and not activated else y


def expand_depthwise(xp, x, we, be, wd, bd, epilogue_e, epilogue, expand_attrs, auto_pad="NOTSET", dilations=None,
                     group=1, kernel_shape=None, pads=None, strides=None, wp=None, bp=None, project_attrs=None,
                     residual=False):
    """``conv(conv(x, we, be, epilogue=epilogue_e), wd, bd, group=..., epilogue=epilogue)``
    for a 1x1 conv (stride 1, no pads, one group: ``expand_attrs``) and a depthwise conv
    after it (the other attributes), then, with ``wp``, a 1x1 conv (bias ``bp`` or None,
    ``project_attrs``) of its value, plus ``x`` with ``residual`` (an inverted residual's
    connection: of x's shape): on the CPU with the compiled kernels, one image at a
    time (:func:`~gpu_mdf.engine.ops.cpu.expand_depthwise_fn`); as the convs apart elsewhere
    (the kernels turned off since the program was made, a type they do not take)."""
    return expand_depthwise_fn(xp, we, be, wd, bd, epilogue_e, epilogue, expand_attrs, auto_pad, dilations, group,
                               kernel_shape, pads, strides, wp, bp, project_attrs, residual)(x)


def expand_depthwise_fn(xp, we, be, wd, bd, epilogue_e, epilogue, expand_attrs, auto_pad="NOTSET", dilations=None,
                        group=1, kernel_shape=None, pads=None, strides=None, wp=None, bp=None, project_attrs=None,
                        residual=False):
    """:func:`expand_depthwise` of these weights (a program's constants) as a function of
    ``x``, which makes its form for an input's shape and type (and whether the kernels
    run) once: the checks, the geometry, the weights' and epilogues' forms, where each call
    made them again (20-60 us a call, 0.5 ms of Keras MobileNetV2's block of 11)."""
    attrs = (auto_pad, _tuple(dilations), int(group), _tuple(kernel_shape), _tuple(pads), _tuple(strides))
    made: dict = {}

    def run(x):
        kernels = xp is np and cpu.takes(x.dtype) and cpu.products_available()
        key = (x.shape, x.dtype, kernels)
        f = made.get(key)
        if f is None:
            if len(made) >= _MADE_PER_STEP:          # a server's many batch sizes: kept bounded
                made.clear()
            f = made[key] = _expand_runner(xp, x, we, be, wd, bd, wp, bp, epilogue_e, epilogue, expand_attrs,
                                           project_attrs, attrs, kernels, residual)
        return f(x)
    return run


#: input shapes a bound step keeps its forms for (:func:`expand_depthwise_fn`)
_MADE_PER_STEP = 64


def plain_pointwise(attrs: dict) -> bool:
    """Whether a 1x1 Conv's attributes leave its input as it is: no pads, stride 1, one group."""
    return not any(_tuple(attrs.get("pads")) or ()) and all(v == 1 for v in attrs.get("strides") or ()) \
        and int(attrs.get("group", 1)) == 1 and attrs.get("auto_pad", "NOTSET") == "NOTSET"


def _expand_runner(xp, x, we, be, wd, bd, wp, bp, epilogue_e, epilogue, expand_attrs, project_attrs, attrs, kernels,
                   residual):
    """:func:`expand_depthwise` of these weights for inputs of ``x``'s shape and type, a
    function of ``x``: the fused kernel where it takes them, else the convs apart."""
    auto_pad, dilations, group, kernel_shape, pads, strides = attrs
    cm = wd.shape[0]
    if residual and wp is None:
        raise OpError("an inverted residual's Add without its projection")
    expansion = we is None or (be is not None and we.shape == (cm, x.shape[1], 1, 1) and x.dtype == we.dtype
                               and plain_pointwise(expand_attrs))
    fused = kernels and x.ndim == 4 and expansion and bd is not None and wd.shape[:2] == (cm, 1) and group == cm \
        and x.dtype == wd.dtype and (we is not None or x.shape[1] == cm) \
        and (wp is None or (wp.dtype == x.dtype and wp.shape[1:] == (cm, 1, 1) and plain_pointwise(project_attrs)))
    if not fused:
        def apart(x):
            y = x if we is None else conv(xp, x, we, be, epilogue=epilogue_e, **expand_attrs)
            y = conv(xp, y, wd, bd, auto_pad, dilations, group, kernel_shape, pads, strides, epilogue=epilogue)
            y = y if wp is None else conv(xp, y, wp, bp, **project_attrs)
            if residual and y.shape != x.shape:
                raise OpError(f"an inverted residual's Add of {x.shape} to its projection's {y.shape}")
            return y + x if residual else y
        return apart
    kernel, strides, dil, pads, out = _conv_geometry((x.shape[0], cm) + x.shape[2:], wd.shape, *attrs)
    if we is not None:
        _check_bias("Conv", be.shape, cm)
    _check_bias("Conv", bd.shape, cm)
    if wp is not None:
        _check_bias("Conv", None if bp is None else bp.shape, wp.shape[0])
    e_shape = (x.shape[0],) + out + (cm,)
    if residual and (wp.shape[0], *out) != x.shape[1:]:
        raise OpError(f"an inverted residual's Add of {x.shape} to its projection's {(x.shape[0], wp.shape[0], *out)}")

    def transposed(w):
        return weight_form(w, "1x1 transposed", lambda: np.ascontiguousarray(w.reshape(w.shape[0], -1).T))
    fn = cpu.expand_depthwise_fn(None if we is None else transposed(we), be, epilogue_e, wd, bd, kernel, strides,
                                 dil, pads, out, epilogue, None if wp is None else transposed(wp), bp, x.dtype,
                                 residual)

    def run(x):
        check_alloc(e_shape)
        return _to_nchw(xp, fn(_channels_last(xp, x)))
    return run


def _activations(xp, y, epilogue):
    """The ``epilogue`` on ``y`` in place, each op by its fused form's NumPy (or CuPy) form."""
    from .fusion import FUSIBLE
    for name, *consts in epilogue:
        at = {"min": consts[0], "max": consts[1]} if name == "onnx::Clip" else {}
        other = xp.asarray(consts[0], dtype=y.dtype) if name == "gpu_mdf::CapAt" else None
        r = FUSIBLE[name].numpy(y, other, y, at)
        if r is not y:
            y[...] = r
    return y


def _conv_geometry(x_shape, w_shape, auto_pad, dilations, group, kernel_shape, pads, strides):
    """A Conv's checked geometry (kernel, strides, dilations, pads, out), each a tuple:
    ONNX's rules, every attribute checked; an OpError for a conv that does not fit."""
    nsp = len(x_shape) - 2
    if nsp < 1 or len(w_shape) != len(x_shape):
        raise OpError(f"Conv of a rank-{len(x_shape)} input with a rank-{len(w_shape)} kernel")
    if kernel_shape is not None and tuple(kernel_shape) != tuple(w_shape[2:]):
        raise OpError(f"Conv kernel_shape {kernel_shape} does not match the weights {w_shape[2:]}")
    c, f, g = x_shape[1], w_shape[0], int(group)
    if g < 1 or c % g or f % g or w_shape[1] != c // g:
        raise OpError(f"Conv: {c} input channels, weights {w_shape}, group {g} do not fit")
    kernel, strides, dil, pads = _window_params(x_shape[2:], w_shape[2:], strides, dilations, pads, auto_pad,
                                                "Conv")
    out, _ = _out_sizes(x_shape[2:], kernel, strides, dil, pads)
    return kernel, strides, dil, pads, tuple(out)


#: conv runners (:func:`_conv_runner`) by shapes, types and attributes: a batch's conv reruns
#: none of the checks, the arithmetic or the choice of algorithm (their Python was most of a
#: small conv's fixed cost, 10-17 us, all of it holding the GIL that Program.run's block
#: threads share)
_RUNNERS: dict = {}


def _tuple(v):
    return v if v is None or isinstance(v, (str, int)) else tuple(v)


def _conv(xp, x, w, b, auto_pad, dilations, group, kernel_shape, pads, strides, winograd, epilogue):
    """(the conv, whether its ``epilogue`` ran too)"""
    kernels = xp is np and cpu.takes(x.dtype)
    key = (xp, x.shape, x.dtype, w.shape, w.dtype, None if b is None else b.shape, auto_pad, _tuple(dilations),
           int(group), _tuple(kernel_shape), _tuple(pads), _tuple(strides), bool(winograd),
           tuple(tuple(op) for op in epilogue), kernels)
    return remembered(_RUNNERS, key, lambda: _conv_runner(*key))(x, w, b)


def _conv_runner(xp, x_shape, dtype, w_shape, w_dtype, b_shape, auto_pad, dilations, group, kernel_shape, pads,
                 strides, winograd, epilogue, kernels):
    """The conv of these shapes and attributes as a function of its arrays ``(x, w, b)`` ->
    (y, whether the epilogue ran): the geometry checked, the algorithm chosen, once.
    ``kernels``: whether the compiled CPU kernels run (read per call by :func:`_conv`)."""
    kernel, strides, dil, pads, out = _conv_geometry(x_shape, w_shape, auto_pad, dilations, group, kernel_shape,
                                                     pads, strides)
    nsp = len(x_shape) - 2
    n, c, f, g = x_shape[0], x_shape[1], w_shape[0], group
    _check_bias("Conv", b_shape, f)
    cg, fg = c // g, f // g
    rows = n * math.prod(out)
    y_shape = (n,) + tuple(out) + (f,)
    kernels = kernels and nsp == 2

    def finish(yl, b):
        yl = yl.reshape(y_shape)
        if b is not None:
            yl = add_trailing(xp, yl, b, inplace=True)
        return _to_nchw(xp, yl), False

    if xp is not np and nsp == 2 and _gpu_conv_kernel(kernel, cg, g, dtype):
        return lambda x, w, b: finish(_conv_generated(xp, _channels_last(xp, x), w, kernel, strides, dil, pads, out,
                                                      g, fg), b)
    # compiled CPU kernels (2-D): a depthwise conv, and one with a channel multiplier where it
    # runs by rows (5-8x NumPy's einsum). A conv of one input channel is one too, but im2col and
    # a GEMM are faster there (1.3-1.9x, measured)
    if kernels and cg == 1 and g > 1 and (fg == 1 or cpu.depthwise_by_rows(c, f, kernel, strides, out[1])):
        def depthwise(x, w, b):
            check_alloc(y_shape)
            return _to_nchw(xp, cpu.depthwise(_channels_last(xp, x), w, b, kernel, strides, dil, pads, out,
                                              epilogue)), True
        return depthwise
    if cg == 1 and g > 1:
        return lambda x, w, b: finish(_depthwise(xp, _padded_last(xp, x, pads, nsp), w, kernel, strides, dil, out,
                                                 g, fg), b)
    # the bias and activations of a product a block of rows at a time (passes.pointwise_epilogue)
    by_blocks = kernels and epilogue and g == 1 and b_shape is not None and w_dtype == dtype and not winograd
    if all(k == 1 for k in kernel):
        strided = (slice(None),) + tuple(slice(0, (m - 1) * s + 1, s) for m, s in zip(out, strides))

        def cols(x):
            return xp.ascontiguousarray(_padded_last(xp, x, pads, nsp)[strided]).reshape(rows, c)
        if by_blocks:
            return _product_epilogue(xp, cols, lambda w: w.reshape(f, c).T, epilogue, y_shape)
        return lambda x, w, b: finish(_grouped_matmul(xp, cols(x), w.reshape(f, cg), g, 1), b)
    if g > 1:
        return lambda x, w, b: finish(_grouped_conv(xp, _columns(xp, x, kernel, strides, dil, pads, out, kernels), w,
                                                    kernel, g), b)

    def im2col_weights(w):
        return weight_form(w, "im2col", lambda: xp.transpose(w, tuple(range(2, 2 + nsp)) + (1, 0)).reshape(-1, f))
    # 2 to 4 channels (an image's stem: 2.3x the planes below at 96x96, 1.07x at 224x224);
    # MNIST's one channel at 28x28 runs as planes (by images: 0.87x)
    if kernels and 2 <= c <= PLANES_UP_TO and w_dtype == dtype and cpu.products_available():
        def general(x, w, b):     # its columns an image at a time, in cache; the bias and epilogue there too
            check_alloc(y_shape)
            return _to_nchw(xp, cpu.conv_images(_channels_last(xp, x), im2col_weights(w), b, epilogue, kernel,
                                                strides, dil, pads, out)), True
    elif c == 1 or (xp is np and c <= PLANES_UP_TO and math.prod(kernel) <= 9):   # (rows, window), transposed
        def planes(x):
            return _planes(xp, x, kernel, strides, dil, pads, out).T
        if by_blocks:
            return _product_epilogue(xp, planes, im2col_weights, epilogue, y_shape)
        general = lambda x, w, b: finish(xp.matmul(planes(x), im2col_weights(w)), b)  # noqa: E731
    elif kernels and w_dtype == dtype and cpu.conv_by_blocks(c, math.prod(kernel), f, rows, dtype.itemsize):
        def general(x, w, b):
            check_alloc(y_shape)      # columns a block at a time, in cache
            return finish(cpu.conv_blocks(_channels_last(xp, x), im2col_weights(w), kernel, strides, dil, pads, out),
                          b)
    else:
        general = lambda x, w, b: finish(  # noqa: E731
            xp.matmul(_columns(xp, x, kernel, strides, dil, pads, out, kernels).reshape(rows, -1),
                      im2col_weights(w)), b)   # columns (N, *out, *k, C)
    if winograd and kernels and kernel == (3, 3) and strides == (1, 1) and dil == (1, 1) \
            and n * -(-out[0] // 2) * -(-out[1] // 2) >= cpu.WINOGRAD_MIN_TILES:
        return _winograd_or(xp, general, n, max(c, f), pads, out)
    return general


def _product_epilogue(xp, columns, weights, epilogue, y_shape):
    """A conv runner (:func:`_conv_runner`) whose product ``columns(x) @ weights(w)`` adds
    its bias and runs its ``epilogue`` a block of rows at a time (``cpu.product_epilogue``)."""
    def run(x, w, b):
        yl = cpu.product_epilogue(columns(x), weights(w), b, epilogue)
        return _to_nchw(xp, yl.reshape(y_shape)), True
    return run


def _winograd_or(xp, general, n, channels, pads, out):
    """A conv runner as Winograd's F(2x2, 3x3), or ``general`` where its result holds a NaN
    or an infinity (the transforms spread one over its whole 4x4 tile, 0 x inf being NaN,
    where the direct form puts it only in the windows that hold it)."""
    def run(x, w, b):
        check_alloc([n, out[0] + 2, out[1] + 2, channels, 4])      # its tiles' values: 4x the input's and output's
        yl = cpu.winograd(_channels_last(xp, x), w, b, pads, out)
        if np.isfinite(yl).all():
            return _to_nchw(xp, yl), False
        return general(x, w, b)
    return run


def _padded_last(xp, x, pads, nsp):
    """NCHW ``x`` channels-last with its zero padding (a copy where there is some)."""
    return _pad_spatial(xp, _channels_last(xp, x), pads[:nsp], pads[nsp:], x.dtype.type(0))


def _columns(xp, x, kernel, strides, dil, pads, out, compiled):
    """A convolution's columns (N, *out, *kernel, C), contiguous, of NCHW ``x``: the compiled
    CPU kernel (padding read as zeros) where it runs, else a padded copy and its windows."""
    nsp = len(kernel)
    if compiled:
        check_alloc([x.shape[0]] + list(out) + list(kernel) + [x.shape[1]])
        return cpu.im2col(_channels_last(xp, x), kernel, strides, dil, pads, out)
    xl = _padded_last(xp, x, pads, nsp)
    return _im2col(xp, xl, kernel, strides, dil, out)


def _planes(xp, x, kernel, strides, dil, pads, out):
    """The columns of a conv of a few input channels, transposed: (window offsets x C, N x
    out), one contiguous plane per offset and channel (each a strided slice of the padded
    NCHW input). A GEMM reads them as the columns through a transposed view: the same
    products to rounding (mostly the same bits; OpenBLAS picks another kernel for a
    transposed operand in some shapes, a single filter's matrix-vector product always);
    5x faster to write than columns (N, *out, *k, C), whose rows are a window's few values
    (MNIST's 3x3 stem on 79 images: 1.4 -> 0.27 ms; a 3-channel 3x3 stem of stride 2, in
    Program.run's blocks: 1.3-1.55x the conv)."""
    nsp = len(kernel)
    n, c = x.shape[:2]
    xpd = _pad_spatial(xp, x, pads[:nsp], pads[nsp:], x.dtype.type(0), first=2)      # NCHW: no transpose
    check_alloc((math.prod(kernel) * c, n) + tuple(out))
    planes = xp.empty(tuple(kernel) + (c, n) + tuple(out), dtype=x.dtype)
    for offset in np.ndindex(*kernel):
        window = _offset_slices(offset, dil, strides, out)
        for ch in range(c):
            planes[offset + (ch,)] = xpd[(slice(None), ch) + window]
    return planes.reshape(math.prod(kernel) * c, -1)


#: a conv of this many input channels or fewer, and a window of at most 9 offsets (3x3),
#: writes its columns as planes on the CPU (:func:`_planes`); a 7x7 stem's GEMM reads its
#: 147 planes slower (0.98x)
PLANES_UP_TO = 4


def _grouped_conv(xp, cols, w, kernel, g):
    """A grouped convolution (several channels a group) as one batched product: the
    columns (N, *out, *k, C) regrouped (group, rows, window x channels), against (group,
    window x channels, filters); no Python loop over the groups."""
    c, f = cols.shape[-1], w.shape[0]
    cg, fg, kk = c // g, f // g, math.prod(kernel)
    rows = cols.size // (kk * c)
    cols = xp.ascontiguousarray(cols.reshape(rows, kk, g, cg).transpose(2, 0, 1, 3)).reshape(g, rows, kk * cg)
    wg = weight_form(w, f"grouped {g}", lambda: xp.ascontiguousarray(w.reshape(g, fg, cg, kk).transpose(0, 3, 2, 1))
                     .reshape(g, kk * cg, fg))
    return xp.ascontiguousarray(xp.matmul(cols, wg).transpose(1, 0, 2)).reshape(rows, f)


def _gpu_conv_kernel(kernel, cg, g, dtype) -> bool:
    """Whether a 2-D conv runs through a generated CUDA kernel: depthwise, or one group
    with a window larger than 1x1 (im2col with the padding in its index arithmetic), of a
    type the kernels are written for."""
    from .fusion import KERNEL_DTYPES
    return dtype in KERNEL_DTYPES and ((cg == 1 and g > 1) or (g == 1 and any(k != 1 for k in kernel)))


def _conv_generated(xp, xl, w, kernel, strides, dil, pads, out, g, fg):
    """2-D conv on a GPU, channels-last: one generated kernel for a depthwise conv; an
    im2col kernel and one GEMM otherwise. Pads are read as zeros, never copied."""
    from . import cuda
    n, f = xl.shape[0], w.shape[0]
    if g > 1:
        return cuda.depthwise(xp, xl, w, fg, kernel, strides, dil, pads, out)
    cols = cuda.im2col(xp, xl, kernel, strides, dil, pads, out)
    yl = xp.matmul(cols, w.reshape(f, -1).T)
    return yl.reshape((n,) + tuple(out) + (f,))


def _grouped_matmul(xp, cols, w2, g, k):
    """cols (rows, C*k) @ per-group weights w2 (F, C/g*k) -> (rows, F), weights as a transposed view."""
    if g == 1:
        return xp.matmul(cols, w2.T)
    f = w2.shape[0]
    cg, fg = cols.shape[1] // g, f // g
    return xp.concatenate([xp.matmul(cols[:, i * cg:(i + 1) * cg], w2[i * fg:(i + 1) * fg].T) for i in range(g)],
                          axis=1)


def _depthwise(xp, xl, w, kernel, strides, dil, out, c, m):
    """Depthwise conv (one input channel per group, ``m`` outputs each).

    NumPy: one ``einsum`` over the strided window view (its sum-of-products loop reads
    each window once: 4x faster than a multiply-accumulate per kernel offset). CuPy: a
    multiply-accumulate over the kernel offsets, every term a strided slice (one fused
    elementwise kernel each, no 9x-sized product in device memory)."""
    n = xl.shape[0]
    nsp = len(kernel)
    if xp is np:
        win = _windows(xp, xl, kernel, strides, dil, out)              # (N, *out, *k, C)
        sp, ks = "hwdefg"[:nsp], "pqrstu"[:nsp]
        # contiguous weights: einsum's loop is 7x slower on a strided operand
        wk = np.ascontiguousarray(w.reshape(c, m, -1).transpose(2, 0, 1)).reshape(tuple(kernel) + (c, m))
        if m == 1:
            y = np.einsum(f"n{sp}{ks}c,{ks}c->n{sp}c", win, wk[..., 0])
        else:
            y = np.einsum(f"n{sp}{ks}c,{ks}cm->n{sp}cm", win, wk)
        return y.reshape((n,) + tuple(out) + (c * m,))
    wk = w.reshape(c, m, -1)                                            # (C, m, prod(k))
    acc = None
    tmp = None
    for j, offset in enumerate(np.ndindex(*kernel)):
        sl = xl[(slice(None),) + _offset_slices(offset, dil, strides, out) + (slice(None),)]
        if m == 1:
            wj = wk[:, 0, j]
        else:
            sl = sl[..., None]
            wj = wk[:, :, j]
        if acc is None:
            acc = sl * wj
        else:
            if tmp is None:
                tmp = xp.empty_like(acc)
            xp.multiply(sl, wj, out=tmp)
            acc += tmp
    return acc.reshape((n,) + tuple(out) + (c * m,))


def _check_conv_transpose(a):
    _check_window_attrs(a)


@op("onnx::ConvTranspose", ("X", "W"), optional=("B",), fresh=True, check=_check_conv_transpose,
    attrs={**_CONV_ATTRS, "output_padding": Attr(INTS), "output_shape": Attr(INTS)})
def conv_transpose(xp, x, w, b=None, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None,
                   strides=None, output_padding=None, output_shape=None):
    """ONNX ConvTranspose: every input pixel scatters ``x @ W[:, :, k]`` to ``i*s + k*d``,
    then the pads are cropped. Channels-last, one GEMM per kernel offset and group."""
    nsp = x.ndim - 2
    c, g = x.shape[1], int(group)
    if w.ndim != x.ndim or w.shape[0] != c or c % g:
        raise OpError(f"ConvTranspose: input channels {c}, weights {w.shape}, group {g} do not fit")
    kernel = tuple(w.shape[2:])
    if kernel_shape is not None and tuple(kernel_shape) != kernel:
        raise OpError(f"ConvTranspose kernel_shape {kernel_shape} does not match the weights {kernel}")
    fg = w.shape[1]
    f = fg * g
    _check_bias("ConvTranspose", None if b is None else b.shape, f)
    strides = tuple(strides or (1,) * nsp)
    dil = tuple(dilations or (1,) * nsp)
    if len(strides) != nsp or len(dil) != nsp:
        raise OpError(f"ConvTranspose: strides/dilations do not match {nsp} spatial axes")
    _check_positive("ConvTranspose", kernel=kernel, strides=strides, dilations=dil)
    opad = tuple(output_padding or (0,) * nsp)
    in_sp = x.shape[2:]
    full = [s * (n - 1) + op_ + (k - 1) * d + 1 for n, s, op_, k, d in zip(in_sp, strides, opad, kernel, dil)]
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        want = list(output_shape)[-nsp:] if output_shape is not None else [n * s for n, s in zip(in_sp, strides)]
        total = [fl - o for fl, o in zip(full, want)]     # negative: the output extends past the full one
        upper = auto_pad == "SAME_UPPER"       # explicit output_shape pads like SAME_LOWER (as ONNX Runtime)
        begin = [t // 2 if upper else t - t // 2 for t in total]
        pads = tuple(begin + [t - bb for t, bb in zip(total, begin)])
    elif auto_pad == "VALID" or not pads:
        pads = (0,) * (2 * nsp)
    if len(pads) != 2 * nsp:
        raise OpError(f"ConvTranspose: {len(pads)} pads for {nsp} spatial axes")
    n = x.shape[0]
    check_alloc([n] + full + [f])
    xl = xp.ascontiguousarray(_channels_last(xp, x)).reshape(-1, c)      # (N*in, C)
    yl = xp.zeros((n,) + tuple(full) + (f,), dtype=x.dtype)
    cg = c // g
    for offset in np.ndindex(*kernel):
        index = (slice(None),) + tuple(slice(o * d, o * d + (m - 1) * s + 1, s)
                                       for o, d, s, m in zip(offset, dil, strides, in_sp)) + (slice(None),)
        wk = w[(slice(None), slice(None)) + offset]                      # (C, F/g)
        if g == 1:
            contrib = xp.matmul(xl, wk)
        else:
            contrib = xp.concatenate([xp.matmul(xl[:, i * cg:(i + 1) * cg], wk[i * cg:(i + 1) * cg])
                                      for i in range(g)], axis=1)
        yl[index] += contrib.reshape((n,) + tuple(in_sp) + (f,))
    yl = yl[(slice(None),) + tuple(slice(max(pads[i], 0), full[i] - max(pads[i + nsp], 0)) for i in range(nsp))
            + (slice(None),)]
    yl = _pad_spatial(xp, yl, [max(-p, 0) for p in pads[:nsp]], [max(-p, 0) for p in pads[nsp:]], x.dtype.type(0))
    if b is not None:
        yl = yl + b
    return _to_nchw(xp, yl)


# --------------------------------------------------------------------------- #
# Pooling
# --------------------------------------------------------------------------- #
def _lowest(dtype):
    return dtype.type(-np.inf) if dtype.kind == "f" else np.iinfo(dtype).min


def _pool_setup(x, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode, what):
    if kernel_shape is None:
        raise OpError(f"{what} needs kernel_shape")
    nsp = x.ndim - 2
    if len(kernel_shape) != nsp:
        raise OpError(f"{what}: kernel_shape {kernel_shape} for {nsp} spatial axes")
    kernel, strides, dil, pads = _window_params(x.shape[2:], kernel_shape, strides, dilations, pads, auto_pad, what)
    out, extra = _out_sizes(x.shape[2:], kernel, strides, dil, pads, ceil_mode)
    return kernel, strides, dil, pads, out, extra


_POOL_ATTRS = {"auto_pad": Attr(STRING, "NOTSET"), "ceil_mode": Attr(INT, 0), "dilations": Attr(INTS),
               "kernel_shape": Attr(INTS), "pads": Attr(INTS), "strides": Attr(INTS)}


def _check_maxpool(a):
    _check_window_attrs(a)
    if a["storage_order"] not in (0, 1):
        raise OpError(f"storage_order {a['storage_order']} (expected 0 or 1)")


@op("onnx::MaxPool", ("X",), outputs=("Y", "Indices"), check=_check_maxpool,
    attrs={**_POOL_ATTRS, "storage_order": Attr(INT, 0)})
def max_pool(xp, x, auto_pad, ceil_mode, dilations, kernel_shape, pads, strides, storage_order, n_outputs=1):
    kernel, strides, dil, pads, out, extra = _pool_setup(x, kernel_shape, strides, pads, dilations, auto_pad,
                                                         ceil_mode, "MaxPool")
    nsp = len(kernel)
    if xp is np and nsp == 2 and n_outputs == 1 and cpu.takes(x.dtype):
        check_alloc([x.shape[0]] + list(out) + [x.shape[1]])
        return (_to_nchw(xp, cpu.max_pool(_channels_last(xp, x), kernel, strides, dil, pads, out)),)
    low = _lowest(x.dtype)
    xl = _pad_spatial(xp, _channels_last(xp, x), pads[:nsp], [p + e for p, e in zip(pads[nsp:], extra)], low)
    y = idx = None
    for offset in np.ndindex(*kernel):
        v = xl[(slice(None),) + _offset_slices(offset, dil, strides, out) + (slice(None),)]
        if n_outputs > 1:
            pos = device_const(xp, ("maxpool-idx", x.shape, offset, strides, dil, pads, tuple(out), storage_order),
                               lambda o=offset: _flat_indices(x.shape, o, strides, dil, pads, out, storage_order))
            if y is None:
                y, idx = v.copy(), xp.broadcast_to(pos, v.shape).copy()
            else:
                better = v > y
                y = xp.where(better, v, y)
                idx = xp.where(better, pos, idx)
        elif y is None:
            y = v.copy()
        else:
            xp.maximum(y, v, out=y)
    res = _to_nchw(xp, y)
    return (res, _to_nchw(xp, idx)) if n_outputs > 1 else (res,)


def _flat_indices(shape, offset, strides, dil, pads, out, storage_order):
    """ONNX MaxPool Indices of the window element at ``offset`` for every output position:
    ``(n * C + c) * prod(S) + position`` in the unpadded input, the spatial position
    row-major (storage_order 0) or column-major (1), as ONNX Runtime computes it; an
    (N, *out, C) array (channels-last, like the pooled values). Padding never wins a max
    against real values, so clipping padded coordinates is harmless."""
    n, c = shape[0], shape[1]
    sp = list(shape[2:])
    nsp = len(sp)
    coords = [np.clip(np.arange(m) * s + o * d - pads[i], 0, sp[i] - 1)
              for i, (m, s, o, d) in enumerate(zip(out, strides, offset, dil))]
    grids = np.meshgrid(*coords, indexing="ij")
    pos, mult = 0, 1
    axes = range(nsp) if storage_order else reversed(range(nsp))
    for a in axes:
        pos = pos + grids[a] * mult
        mult *= sp[a]
    plane = int(np.prod(sp))
    nc = (np.arange(n)[:, None] * c + np.arange(c)[None, :]) * plane          # (N, C)
    idx = nc.reshape((n,) + (1,) * nsp + (c,)) + pos.reshape((1,) + pos.shape + (1,))
    return np.ascontiguousarray(idx).astype(np.int64)


def _check_avgpool(a):
    _check_window_attrs(a)
    if a["count_include_pad"] not in (0, 1):
        raise OpError(f"count_include_pad {a['count_include_pad']} (expected 0 or 1)")


@op("onnx::AveragePool", ("X",), check=_check_avgpool, fresh=True,
    attrs={**_POOL_ATTRS, "count_include_pad": Attr(INT, 0)})
def average_pool(xp, x, auto_pad, ceil_mode, dilations, kernel_shape, pads, strides, count_include_pad):
    kernel, strides, dil, pads, out, extra = _pool_setup(x, kernel_shape, strides, pads, dilations, auto_pad,
                                                         ceil_mode, "AveragePool")
    nsp = len(kernel)
    after = [p + e for p, e in zip(pads[nsp:], extra)]
    xl = _pad_spatial(xp, _channels_last(xp, x), pads[:nsp], after, x.dtype.type(0))
    total = None
    for offset in np.ndindex(*kernel):
        v = xl[(slice(None),) + _offset_slices(offset, dil, strides, out) + (slice(None),)]
        if total is None:
            total = v.copy()
        else:
            total += v
    if not any(pads) and not any(extra):
        total /= x.dtype.type(np.prod(kernel))
    else:
        # window sizes: real elements only, or real + explicit pads (never the ceil_mode overhang)
        counts = device_const(xp, ("avgpool-count", x.shape[2:], kernel, strides, dil, pads, tuple(extra),
                                   count_include_pad, x.dtype.str),
                              lambda: _pool_counts(x.shape[2:], kernel, strides, dil, pads, extra, out,
                                                   count_include_pad, x.dtype))
        total /= counts
    return _to_nchw(xp, total)


def _pool_counts(sp, kernel, strides, dil, pads, extra, out, include_pad, dtype):
    nsp = len(sp)
    inside = np.ones(tuple(sp), dtype)
    width = [(pads[i], pads[i + nsp] + extra[i]) for i in range(nsp)]
    if include_pad:   # explicit pads count, the ceil_mode overhang does not
        inside = np.pad(inside, [(pads[i], pads[i + nsp]) for i in range(nsp)], constant_values=1)
        width = [(0, extra[i]) for i in range(nsp)]
    m = np.pad(inside, width)
    total = np.zeros(tuple(out), dtype)
    for offset in np.ndindex(*kernel):
        total += m[_offset_slices(offset, dil, strides, out)]
    return total[None, ..., None]


@op("onnx::GlobalAveragePool", fresh=True)
def global_average_pool(xp, x):
    sums = _spatial_sums(x) if xp is np else None
    if sums is not None:
        return np.divide(sums, x.dtype.type(math.prod(x.shape[2:])), out=sums)   # as NumPy's mean divides
    return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)


def _spatial_sums(x):
    """Each image's and channel's sum over the spatial axes (keepdims) of a float NCHW ``x``
    in NCHW or channels-last memory, as one BLAS product with a vector of ones (8x NumPy's
    reduction of channels-last memory: EfficientNet's squeeze-excite, 4.8 MB in 0.07 ms
    against 0.6 ms); None for other layouts, dtypes and small inputs."""
    if x.ndim < 3 or x.dtype not in (np.float32, np.float64) or x.size < 4096:
        return None
    n, c, hw = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    ones = np.ones(hw, x.dtype)
    if x.flags.c_contiguous:
        sums = x.reshape(n * c, hw) @ ones
    elif np.moveaxis(x, 1, -1).flags.c_contiguous:
        sums = np.matmul(ones, np.moveaxis(x, 1, -1).reshape(n, hw, c))
    else:
        return None
    return sums.reshape((n, c) + (1,) * (x.ndim - 2))


@op("onnx::GlobalMaxPool", fresh=True)
def global_max_pool(xp, x):
    return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)


# --------------------------------------------------------------------------- #
# Normalisation
# --------------------------------------------------------------------------- #
def _check_bn(a):
    if a["training_mode"]:
        raise OpError("BatchNormalization training_mode=1: the batch engine runs inference only")
    if a["spatial"] != 1:
        raise OpError("BatchNormalization spatial=0 (opset < 9 per-element statistics) is not supported")


@op("onnx::BatchNormalization", ("X", "scale", "B", "input_mean", "input_var"),
    outputs=("Y", "running_mean", "running_var"), check=_check_bn, fresh=True, since=7,
    attrs={"epsilon": Attr(FLOAT, 1e-5), "momentum": Attr(FLOAT, 0.9), "training_mode": Attr(INT, 0),
           "spatial": Attr(INT, 1)})
def batch_norm(xp, x, scale, b, mean, var, epsilon, momentum, training_mode, spatial, n_outputs=1):
    # momentum only updates running statistics in training mode, which is refused
    if n_outputs > 1:
        raise OpError("BatchNormalization running_mean/running_var exist in training mode only")
    shape = (1, -1) + (1,) * (x.ndim - 2)  # channel axis 1
    t = x.dtype.type
    inv = (scale / xp.sqrt(var + t(epsilon))).astype(x.dtype, copy=False)
    shift = (b - mean * inv).astype(x.dtype, copy=False)
    return (x * inv.reshape(shape) + shift.reshape(shape),)


@op("onnx::InstanceNormalization", ("input", "scale", "B"), outputs=("output",), attrs={"epsilon": Attr(FLOAT, 1e-5)},
    fresh=True)
def instance_norm(xp, x, scale, b, epsilon):
    axes = tuple(range(2, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    d = x - mu
    var = (d * d).mean(axis=axes, keepdims=True)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return d / xp.sqrt(var + x.dtype.type(epsilon)) * scale.reshape(shape) + b.reshape(shape)


def _check_ln(a):
    if a["stash_type"] not in (1, 11):
        raise OpError(f"LayerNormalization stash_type {a['stash_type']} (expected 1 or 11)")


@op("onnx::LayerNormalization", ("X", "Scale"), optional=("B",), outputs=("Y", "Mean", "InvStdDev"), fresh=True,
    check=_check_ln, attrs={"axis": Attr(INT, -1), "epsilon": Attr(FLOAT, 1e-5), "stash_type": Attr(INT, 1)})
def layer_norm(xp, x, scale, b=None, axis=-1, epsilon=1e-5, stash_type=1, n_outputs=1):
    axes = tuple(range(norm_axis(axis, x.ndim), x.ndim))
    xs = x.astype(np.float64 if stash_type == 11 else np.float32, copy=False) if x.dtype.kind == "f" else x
    mu = xs.mean(axis=axes, keepdims=True)
    d = xs - mu
    var = (d * d).mean(axis=axes, keepdims=True)
    inv = 1 / xp.sqrt(var + xs.dtype.type(epsilon))
    y = (d * inv).astype(x.dtype, copy=False) * scale
    if b is not None:
        y = y + b
    return (y, mu, inv)[:n_outputs]


@op("onnx::LRN", attrs={"alpha": Attr(FLOAT, 1e-4), "beta": Attr(FLOAT, 0.75), "bias": Attr(FLOAT, 1.0),
                        "size": Attr(INT)}, fresh=True)
def lrn(xp, x, alpha, beta, bias, size):
    if not size or size < 1:
        raise OpError("LRN needs a positive size")
    c = x.shape[1]
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = x * x
    shape = list(sq.shape)
    shape[1] = c + lo + hi
    padded = xp.zeros(shape, dtype=x.dtype)
    padded[:, lo:lo + c] = sq
    s = padded[:, 0:c].copy()
    for i in range(1, size):
        s += padded[:, i:i + c]
    t = x.dtype.type
    return x / (t(bias) + t(alpha / size) * s) ** t(beta)


# --------------------------------------------------------------------------- #
# Softmax family
# --------------------------------------------------------------------------- #
def _reduce_last(xp, x, how):
    """max/sum over a short last axis. NumPy reduces a 10-wide axis slowly (0.5 ms for
    10k rows); folding column by column (max) or a BLAS product (sum) is 3-4x faster."""
    if xp is np and x.ndim == 2 and x.shape[1] <= 64 and x.shape[0] >= 64 and x.dtype.kind == "f":
        if how == "sum":
            return x @ np.ones((x.shape[1], 1), x.dtype)
        m = x[:, 0].copy()
        for j in range(1, x.shape[1]):
            np.maximum(m, x[:, j], out=m)
        return m[:, None]
    return x.max(axis=-1, keepdims=True) if how == "max" else x.sum(axis=-1, keepdims=True)


def _shift(xp, x, axis, inplace):
    """x - max(x) along axis, in x's own memory when allowed."""
    last = norm_axis(axis, x.ndim) == x.ndim - 1
    m = _reduce_last(xp, x, "max") if last else x.max(axis=axis, keepdims=True)
    return xp.subtract(x, m, out=x if inplace else None), last


@op("onnx::Softmax", ("input",), outputs=("output",), fresh=True, inplace=True, attrs={"axis": Attr(INT, -1)},
    since=13)
def softmax(xp, x, axis, inplace=False):
    e, last = _shift(xp, x, axis, inplace)
    xp.exp(e, out=e)
    e /= _reduce_last(xp, e, "sum") if last else e.sum(axis=axis, keepdims=True)
    return e


@op("onnx::LogSoftmax", ("input",), outputs=("output",), fresh=True, inplace=True, attrs={"axis": Attr(INT, -1)},
    since=13)
def log_softmax(xp, x, axis, inplace=False):
    s, last = _shift(xp, x, axis, inplace)
    e = xp.exp(s)
    s -= xp.log(_reduce_last(xp, e, "sum") if last else e.sum(axis=axis, keepdims=True))
    return s


@op("onnx::Hardmax", ("input",), outputs=("output",), fresh=True, attrs={"axis": Attr(INT, -1)}, since=13)
def hardmax(xp, x, axis):
    a = norm_axis(axis, x.ndim)
    idx = xp.expand_dims(xp.argmax(x, axis=a), a)
    ar = device_const(xp, ("hardmax", x.shape[a], a, x.ndim),
                      lambda: np.arange(x.shape[a]).reshape([-1 if i == a else 1 for i in range(x.ndim)]))
    return (ar == idx).astype(x.dtype)


def _as_2d(fn):
    """Softmax, LogSoftmax and Hardmax before opset 13: the input is seen as 2-D, the
    axes before ``axis`` (default 1) flattened into rows and the rest into columns, and
    the function applies along the columns."""
    def kernel(xp, x, axis=1, inplace=False):
        a = norm_axis(axis, x.ndim) if x.ndim else 0
        rows = int(np.prod(x.shape[:a], dtype=np.int64))
        flat = x.reshape(rows, -1)
        kw = {"inplace": inplace} if inplace else {}
        return fn(xp, flat, axis=1, **kw).reshape(x.shape)
    return kernel


op("onnx::Softmax", ("input",), outputs=("output",), fresh=True, inplace=True, attrs={"axis": Attr(INT, 1)},
   until=12)(_as_2d(softmax))
op("onnx::LogSoftmax", ("input",), outputs=("output",), fresh=True, inplace=True, attrs={"axis": Attr(INT, 1)},
   until=12)(_as_2d(log_softmax))
op("onnx::Hardmax", ("input",), outputs=("output",), fresh=True, attrs={"axis": Attr(INT, 1)}, until=12)(
    _as_2d(hardmax))


@op("onnx::Dropout", ("data",), optional=("ratio", "training_mode"), outputs=("output", "mask"),
    static=("ratio", "training_mode"), attrs={"seed": Attr(INT), "ratio": Attr(FLOAT), "is_test": Attr(INT, 1)},
    since=10)
def dropout(xp, x, ratio_in=None, training=None, seed=None, ratio=None, is_test=1, n_outputs=1, mask_dtype=bool):
    """Inference: the identity, and a mask of ones (seed and ratio only matter in training
    mode, which is refused)."""
    if training is not None and bool(scalar(training)) or not is_test:
        raise OpError("Dropout in training mode: the batch engine runs inference only")
    return (x, xp.ones(x.shape, dtype=mask_dtype))[:n_outputs]


@op("onnx::Dropout", ("data",), outputs=("output", "mask"), since=7, until=9,
    attrs={"ratio": Attr(FLOAT), "is_test": Attr(INT, 1)})
def dropout_7(xp, x, ratio=None, is_test=1, n_outputs=1):
    """Before opset 10 the mask has the data's type."""
    return dropout(xp, x, ratio=ratio, is_test=is_test, n_outputs=n_outputs, mask_dtype=x.dtype)
