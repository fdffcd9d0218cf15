"""Shape, indexing and reduction ops.

Shape-like inputs (``shape``, ``axes``, ``pads``, ``starts``...) are declared static:
they arrive as host arrays, so these kernels compute every size and index on the host
and touch the device only to move or view data.
"""

from __future__ import annotations

import math

import numpy as np

from . import FLOAT, INT, INTS, STRING, TENSOR, Attr, OpError, check_alloc, cpu, ints, norm_axis, op, scalar


def _axes_arg(given_input, given_attr, what="axes"):
    if given_input is not None and given_attr is not None:
        raise OpError(f"{what} given both as input and as attribute")
    if given_input is not None:
        return ints(given_input)
    return given_attr


# --------------------------------------------------------------------------- #
# Shapes and constants
# --------------------------------------------------------------------------- #
@op("onnx::Shape", ("data",), outputs=("shape",), attrs={"start": Attr(INT, 0), "end": Attr(INT)},
    shape_only=True)
def shape(xp, x, start, end):
    return np.array(x.shape[start:end], dtype=np.int64)


@op("onnx::Size", ("data",), outputs=("size",), shape_only=True)
def size(xp, x):
    return np.array(int(np.prod(x.shape)), dtype=np.int64)


def _check_constant(a):
    given = [k for k in ("value", "value_float", "value_floats", "value_int", "value_ints") if a[k] is not None]
    if len(given) != 1:
        raise OpError(f"Constant needs exactly one of value, value_float(s), value_int(s); got {given or 'none'}"
                      " (sparse and string constants are not supported)")


@op("onnx::Constant", (), outputs=("output",), check=_check_constant,
    attrs={"value": Attr(TENSOR), "value_float": Attr(FLOAT), "value_floats": Attr("FLOATS"),
           "value_int": Attr(INT), "value_ints": Attr(INTS)})
def constant(xp, value, value_float, value_floats, value_int, value_ints):
    if value is not None:
        return np.asarray(value)
    if value_float is not None:
        return np.array(value_float, np.float32)
    if value_floats is not None:
        return np.array(value_floats, np.float32)
    if value_int is not None:
        return np.array(value_int, np.int64)
    return np.array(value_ints, np.int64)


@op("onnx::ConstantOfShape", ("input",), outputs=("output",), static=("input",), attrs={"value": Attr(TENSOR)},
    fresh=True)
def constant_of_shape(xp, shape_, value):
    dims = ints(shape_)
    check_alloc(dims)
    v = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    if v.size != 1:
        raise OpError(f"ConstantOfShape value must hold one element, got {v.size}")
    return xp.full(dims, v[0].item(), dtype=v.dtype)


@op("onnx::Range", ("start", "limit", "delta"), outputs=("output",), static=("start", "limit", "delta"),
    attrs={"stash_type": Attr(INT, 1)})
def range_(xp, start, limit, delta, stash_type=1):
    """start + i * delta; float16 values are computed in float32 (``stash_type`` 1, the
    default) or in float16 (0), then cast back."""
    dtype = np.asarray(start).dtype
    work = np.dtype(np.float32) if dtype == np.float16 and stash_type == 1 else dtype
    s, lim, d = scalar(start), scalar(limit), scalar(delta)
    if d == 0:
        raise OpError("Range delta is 0")
    n = max(int(np.ceil((lim - s) / d)), 0)
    check_alloc((n,))
    return (xp.arange(n, dtype=work) * work.type(d) + work.type(s)).astype(dtype, copy=False)


# --------------------------------------------------------------------------- #
# Indexing
# --------------------------------------------------------------------------- #
def _wrap_indices(xp, idx, n):
    if idx.dtype.kind not in "iu":
        raise OpError(f"indices must be integers, got {idx.dtype}")
    return xp.where(idx < 0, idx + n, idx)


@op("onnx::Gather", ("data", "indices"), outputs=("output",), attrs={"axis": Attr(INT, 0)}, fresh=True)
def gather(xp, data, idx, axis):
    axis = norm_axis(axis, data.ndim)
    return xp.take(data, _wrap_indices(xp, idx, data.shape[axis]), axis=axis)


@op("onnx::GatherElements", ("data", "indices"), outputs=("output",), attrs={"axis": Attr(INT, 0)},
    fresh=True)
def gather_elements(xp, data, idx, axis):
    axis = norm_axis(axis, data.ndim)
    if idx.ndim != data.ndim or any(i > d for a, (i, d) in enumerate(zip(idx.shape, data.shape)) if a != axis):
        raise OpError(f"GatherElements indices {idx.shape} do not fit data {data.shape}")
    # out[i][j] = data[i][idx[i][j]] (axis 1): the other axes run over the indices' extent
    data = data[tuple(slice(None) if a == axis else slice(0, n) for a, n in enumerate(idx.shape))]
    return xp.take_along_axis(data, _wrap_indices(xp, idx, data.shape[axis]), axis=axis)


@op("onnx::GatherND", ("data", "indices"), outputs=("output",), attrs={"batch_dims": Attr(INT, 0)}, fresh=True)
def gather_nd(xp, data, idx, batch_dims):
    """Slices of ``data`` at the index tuples of the last axis of ``indices``; the first
    ``batch_dims`` axes of both run together."""
    b, k = batch_dims, idx.shape[-1]
    if b < 0 or b >= min(data.ndim, idx.ndim) or data.shape[:b] != idx.shape[:b] or k > data.ndim - b:
        raise OpError(f"GatherND indices {idx.shape} (batch_dims {b}) do not fit data {data.shape}")
    return data[_nd_index(xp, data.shape, idx, b)]


def _nd_index(xp, shape, idx, b=0):
    """An advanced-indexing tuple: the batch axes as aranges, then the last axis of ``idx``
    (negative indices wrapped)."""
    k = idx.shape[-1]
    lead = idx.shape[:-1]
    grids = tuple(xp.arange(shape[i]).reshape([-1 if j == i else 1 for j in range(len(lead))]) for i in range(b))
    cols = tuple(_wrap_indices(xp, idx[..., j], shape[b + j]) for j in range(k))
    return grids + cols


_SCATTER_REDUCTIONS = ("none", "add", "mul", "max", "min")


def _check_scatter(a):
    if a["reduction"] not in _SCATTER_REDUCTIONS:
        raise OpError(f"reduction {a['reduction']!r} (expected one of {', '.join(_SCATTER_REDUCTIONS)})")


def _scatter(xp, out, index, updates, reduction):
    """out[index] = updates, or combined with what is there (duplicate indices accumulate)."""
    if reduction == "none":
        out[index] = updates
        return out
    if xp is np:
        {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}[reduction].at(out, index, updates)
        return out
    import cupyx
    fn = {"add": "scatter_add", "max": "scatter_max", "min": "scatter_min"}.get(reduction)
    if fn is None:
        raise OpError(f"scatter with reduction {reduction!r} is not available on the GPU")
    getattr(cupyx, fn)(out, index, updates)
    return out


@op("onnx::ScatterND", ("data", "indices", "updates"), outputs=("output",), fresh=True, check=_check_scatter,
    attrs={"reduction": Attr(STRING, "none")})
def scatter_nd(xp, data, idx, updates, reduction):
    k = idx.shape[-1]
    if k > data.ndim or updates.shape != idx.shape[:-1] + data.shape[k:]:
        raise OpError(f"ScatterND updates {updates.shape} do not fit indices {idx.shape} and data {data.shape}")
    return _scatter(xp, data.copy(), _nd_index(xp, data.shape, idx), updates, reduction)


@op("onnx::ScatterElements", ("data", "indices", "updates"), outputs=("output",), fresh=True, check=_check_scatter,
    attrs={"axis": Attr(INT, 0), "reduction": Attr(STRING, "none")})
def scatter_elements(xp, data, idx, updates, axis, reduction):
    axis = norm_axis(axis, data.ndim)
    if idx.shape != updates.shape or idx.ndim != data.ndim:
        raise OpError(f"ScatterElements indices {idx.shape} and updates {updates.shape} do not fit data {data.shape}")
    grids = [xp.arange(n).reshape([-1 if j == i else 1 for j in range(idx.ndim)]) for i, n in enumerate(idx.shape)]
    grids[axis] = _wrap_indices(xp, idx, data.shape[axis])
    return _scatter(xp, data.copy(), tuple(grids), updates, reduction)


# --------------------------------------------------------------------------- #
# Reshaping
# --------------------------------------------------------------------------- #
@op("onnx::Unsqueeze", ("data",), optional=("axes",), outputs=("expanded",), static=("axes",),
    attrs={"axes": Attr(INTS)}, alias=True)
def unsqueeze(xp, x, axes_in=None, axes=None):
    ax = _axes_arg(axes_in, axes)
    if ax is None:
        raise OpError("Unsqueeze needs axes")
    r = x.ndim + len(ax)
    ax = sorted(norm_axis(a, r) for a in ax)
    if len(set(ax)) != len(ax):
        raise OpError(f"Unsqueeze axes repeat: {ax}")
    shape = list(x.shape)
    for a in ax:
        shape.insert(a, 1)
    return x.reshape(shape)


@op("onnx::Squeeze", ("data",), optional=("axes",), outputs=("squeezed",), static=("axes",),
    attrs={"axes": Attr(INTS)}, alias=True)
def squeeze(xp, x, axes_in=None, axes=None):
    ax = _axes_arg(axes_in, axes)
    if ax is None:
        return x.reshape([d for d in x.shape if d != 1])
    ax = {norm_axis(a, x.ndim) for a in ax}
    for a in ax:
        if x.shape[a] != 1:
            raise OpError(f"Squeeze axis {a} has size {x.shape[a]}, not 1")
    return x.reshape([d for i, d in enumerate(x.shape) if i not in ax])


@op("onnx::Reshape", ("data", "shape"), outputs=("reshaped",), static=("shape",), attrs={"allowzero": Attr(INT, 0)},
    since=5,
    alias=True)
def reshape(xp, x, shape_, allowzero):
    dims = list(ints(shape_))
    if not allowzero:
        dims = [x.shape[i] if s == 0 else s for i, s in enumerate(dims)]
    return x.reshape(dims)


@op("onnx::Flatten", ("input",), outputs=("output",), attrs={"axis": Attr(INT, 1)}, alias=True)
def flatten(xp, x, axis):
    axis = axis + x.ndim if axis < 0 else axis
    if not 0 <= axis <= x.ndim:
        raise OpError(f"Flatten axis out of range for rank {x.ndim}")
    return x.reshape((math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))


@op("onnx::Transpose", ("data",), outputs=("transposed",), attrs={"perm": Attr(INTS)}, alias=True)
def transpose(xp, x, perm):
    if not hasattr(x, "transpose"):
        return xp.transpose(x, None if perm is None else [int(p) for p in perm])   # a host list, say
    return x.transpose() if perm is None else x.transpose(tuple(perm))     # the method: no wrapper (a view)


@op("onnx::Concat", ("inputs",), outputs=("concat_result",), variadic=True, attrs={"axis": Attr(INT, 0)}, since=4,
    fresh=True)
def concat(xp, *xs, axis):
    return xp.concatenate(xs, axis=norm_axis(axis, xs[0].ndim))


@op("onnx::Split", ("input",), optional=("split",), outputs=("outputs",), variadic_outputs=True, since=2,
    static=("split",), attrs={"axis": Attr(INT, 0), "num_outputs": Attr(INT), "split": Attr(INTS)})
def split(xp, x, split_in=None, axis=0, num_outputs=None, split=None, n_outputs=1):
    axis = norm_axis(axis, x.ndim)
    d = x.shape[axis]
    sizes = _axes_arg(split_in, split, "split")
    if sizes is None:
        n = num_outputs or n_outputs
        if num_outputs is None and d % n:
            raise OpError(f"Split of {d} into {n} equal parts: give split sizes or num_outputs")
        step = -(-d // n)
        sizes = [min(step, d - i * step) for i in range(n)]
    if sum(sizes) != d:
        raise OpError(f"Split sizes {list(sizes)} do not add up to {d}")
    if len(sizes) < n_outputs:
        raise OpError(f"Split has {len(sizes)} outputs; the graph reads output {n_outputs - 1}")
    bounds = np.cumsum([0] + list(sizes)).tolist()
    index = [slice(None)] * x.ndim
    outs = []
    for i in range(n_outputs):
        index[axis] = slice(bounds[i], bounds[i + 1])
        outs.append(x[tuple(index)])
    return tuple(outs)


def _slice_bounds(d, s, e, st):
    if st == 0:
        raise OpError("Slice step 0")
    if s < 0:
        s += d
    if e < 0:
        e += d
    if st > 0:
        s, e = min(max(s, 0), d), min(max(e, 0), d)
        return slice(s, e, st)
    s, e = min(max(s, 0), d - 1), min(max(e, -1), d - 1)
    return slice(s, None if e < 0 else e, st)


@op("onnx::Slice", ("data",), optional=("starts", "ends", "axes", "steps"), outputs=("output",),
    static=("starts", "ends", "axes", "steps"),
    attrs={"starts": Attr(INTS), "ends": Attr(INTS), "axes": Attr(INTS)}, alias=True)
def slice_(xp, x, starts_in=None, ends_in=None, axes_in=None, steps_in=None, starts=None, ends=None, axes=None):
    """Opset 10+ takes starts/ends/axes/steps as inputs; opset 1 as attributes."""
    st = _axes_arg(starts_in, starts, "starts")
    en = _axes_arg(ends_in, ends, "ends")
    ax = _axes_arg(axes_in, axes)
    if st is None or en is None or len(st) != len(en):
        raise OpError("Slice needs starts and ends of the same length")
    ax = list(range(len(st))) if ax is None else [norm_axis(a, x.ndim) for a in ax]
    steps = [1] * len(st) if steps_in is None else list(ints(steps_in))
    index = [slice(None)] * x.ndim
    for s, e, a, step in zip(st, en, ax, steps):
        index[a] = _slice_bounds(x.shape[a], s, e, step)
    return x[tuple(index)]


def _check_pad(a):
    if a["mode"] not in ("constant", "reflect", "edge", "wrap"):
        raise OpError(f"Pad mode {a['mode']!r} (expected constant, reflect, edge or wrap)")


@op("onnx::Pad", ("data",), optional=("pads", "constant_value", "axes"), outputs=("output",), since=2,
    static=("pads", "constant_value", "axes"), check=_check_pad,
    attrs={"mode": Attr(STRING, "constant"), "pads": Attr(INTS), "value": Attr(FLOAT)}, alias=True)
def pad(xp, x, pads_in=None, cval_in=None, axes_in=None, mode="constant", pads=None, value=None):
    """Opset 11+ takes pads (and the value) as inputs; opset 2 as attributes. Negative pads crop."""
    p = _axes_arg(pads_in, pads, "pads")
    if p is None:
        raise OpError("Pad needs pads")
    if cval_in is not None and value is not None:
        raise OpError("Pad value given both as input and as attribute")
    cval = scalar(cval_in) if cval_in is not None else (value or 0)
    ax = list(range(x.ndim)) if axes_in is None else [norm_axis(a, x.ndim) for a in ints(axes_in)]
    if len(p) != 2 * len(ax):
        raise OpError(f"Pad: {len(p)} pads for {len(ax)} axes")
    before, after = [0] * x.ndim, [0] * x.ndim
    for i, a in enumerate(ax):
        before[a], after[a] = p[i], p[i + len(ax)]
    if any(b < 0 for b in before) or any(e < 0 for e in after):    # cropping first
        x = x[tuple(slice(-b if b < 0 else 0, x.shape[i] + e if e < 0 else None)
                    for i, (b, e) in enumerate(zip(before, after)))]
        before, after = [max(b, 0) for b in before], [max(e, 0) for e in after]
    if not any(before) and not any(after):
        return x
    shape = [d + b + e for d, b, e in zip(x.shape, before, after)]
    check_alloc(shape)
    if mode == "constant":
        out = xp.full(shape, x.dtype.type(cval), dtype=x.dtype)
        out[tuple(slice(b, b + d) for b, d in zip(before, x.shape))] = x
        return out
    if mode == "reflect" and any(max(b, e) >= d for b, e, d in zip(before, after, x.shape) if b or e):
        raise OpError("Pad reflect: pads must be smaller than the axis size")
    return xp.pad(x, list(zip(before, after)), mode=mode)


@op("onnx::Tile", ("input", "repeats"), outputs=("output",), static=("repeats",), fresh=True, since=6)
def tile(xp, x, repeats):
    reps = ints(repeats)
    if len(reps) != x.ndim:
        raise OpError(f"Tile: {len(reps)} repeats for rank {x.ndim}")
    check_alloc([d * r for d, r in zip(x.shape, reps)])
    return xp.tile(x, reps)


@op("onnx::Expand", ("input", "shape"), outputs=("output",), static=("shape",))
def expand(xp, x, shape_):
    target = np.broadcast_shapes(x.shape, ints(shape_))
    check_alloc(target)
    return xp.broadcast_to(x, target)


def _check_d2s(a):
    if a.get("mode", "DCR") not in ("DCR", "CRD"):
        raise OpError(f"DepthToSpace mode {a['mode']!r} (expected DCR or CRD)")
    if a["blocksize"] is None or a["blocksize"] < 1:
        raise OpError("blocksize must be a positive integer")


@op("onnx::DepthToSpace", ("input",), outputs=("output",), check=_check_d2s,
    attrs={"blocksize": Attr(INT), "mode": Attr(STRING, "DCR")}, fresh=True)
def depth_to_space(xp, x, blocksize, mode):
    n, c, h, w = x.shape
    b = blocksize
    if mode == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@op("onnx::SpaceToDepth", ("input",), outputs=("output",), check=_check_d2s,
    attrs={"blocksize": Attr(INT), "mode": Attr(STRING, "DCR")}, fresh=True)
def space_to_depth(xp, x, blocksize, mode="DCR"):
    """The inverse of DepthToSpace: blocks move into channels depth-column-row (DCR) or,
    from opset 28, column-row-depth (CRD)."""
    n, c, h, w = x.shape
    b = blocksize
    if mode == "DCR":
        y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    else:
        y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@op("onnx::CumSum", ("x", "axis"), outputs=("y",), static=("axis",),
    attrs={"exclusive": Attr(INT, 0), "reverse": Attr(INT, 0)}, fresh=True)
def cumsum(xp, x, axis, exclusive, reverse):
    a = norm_axis(int(scalar(axis)), x.ndim)
    if reverse:
        x = xp.flip(x, axis=a)
    y = xp.cumsum(x, axis=a, dtype=x.dtype)
    if exclusive:
        y = y - x
    return xp.flip(y, axis=a) if reverse else y


# --------------------------------------------------------------------------- #
# Reductions
# --------------------------------------------------------------------------- #
_REDUCE_ATTRS = {"keepdims": Attr(INT, 1), "noop_with_empty_axes": Attr(INT, 0), "axes": Attr(INTS)}


_EXTREMES = {np.maximum: "max", np.minimum: "min"}      # the folds cpu.reduce_tiles runs in one pass


def _fold_small_axes(xp, x, axes, keepdims, combine):
    """Reduce over a few short axes (e.g. the 2x2 tiles of a pooling) by combining
    strided slices, one axis at a time from the outermost, so the slices keep their
    long contiguous rows (NumPy's reduction over short interleaved axes is 2-4x slower)."""
    if xp is not np or not axes:
        return None
    count = math.prod(x.shape[a] for a in axes)
    if count > 16 or any(x.shape[a] < 2 for a in axes) or len(axes) == x.ndim:
        return None
    out = cpu.reduce_tiles(x, axes, _EXTREMES[combine]) if combine in _EXTREMES else None
    if out is not None:
        return (np.expand_dims(out, tuple(axes)) if keepdims else out), count
    out = x
    for removed, a in enumerate(axes):       # ascending: each step removes one axis
        a -= removed
        parts = [out[(slice(None),) * a + (i,)] for i in range(out.shape[a])]
        acc = combine(parts[0], parts[1])
        for p in parts[2:]:
            combine(acc, p, out=acc)
        out = acc
    if keepdims:
        out = np.expand_dims(out, tuple(axes))
    return out, count


def _reduction(name, fn, small=None):
    def kernel(xp, x, axes_in=None, keepdims=1, noop_with_empty_axes=0, axes=None):
        ax = _axes_arg(axes_in, axes)
        if not ax:
            if noop_with_empty_axes:
                return x
            ax = tuple(range(x.ndim))
        ax = tuple(sorted({norm_axis(a, x.ndim) for a in ax}))
        if small is not None:
            folded = _fold_small_axes(xp, x, ax, keepdims, small[0])
            if folded is not None:
                return small[1](folded)
        return fn(xp, x, ax, bool(keepdims))
    op(f"onnx::{name}", ("data",), optional=("axes",), outputs=("reduced",), static=("axes",),
       attrs=dict(_REDUCE_ATTRS), fresh=True)(kernel)


def _mean_of_folded(folded):
    out, count = folded
    out /= out.dtype.type(count)
    return out


_reduction("ReduceSum", lambda xp, x, a, k: x.sum(axis=a, keepdims=k))
_reduction("ReduceMean", lambda xp, x, a, k: x.mean(axis=a, keepdims=k), (np.add, _mean_of_folded))
def _identity_of_empty(xp, x, a, k, value):
    """A reduction over an axis of length 0: every output element is the identity."""
    shape = [1 if i in a else d for i, d in enumerate(x.shape)] if k else \
        [d for i, d in enumerate(x.shape) if i not in a]
    return xp.full(shape, value, dtype=x.dtype)


def _lowest(dtype, highest=False):
    if dtype.kind == "f":
        return np.inf if highest else -np.inf
    if dtype.kind == "b":
        return highest
    info = np.iinfo(dtype)
    return info.max if highest else info.min


def _extreme(which):
    """ReduceMax/ReduceMin; over an empty axis the identity (-inf/+inf, the type's limits)."""
    def fn(xp, x, a, k):
        if any(x.shape[i] == 0 for i in a):
            return _identity_of_empty(xp, x, a, k, _lowest(x.dtype, highest=which == "min"))
        return x.max(axis=a, keepdims=k) if which == "max" else x.min(axis=a, keepdims=k)
    return fn


_reduction("ReduceMax", _extreme("max"), (np.maximum, lambda f: f[0]))
_reduction("ReduceMin", _extreme("min"), (np.minimum, lambda f: f[0]))
_reduction("ReduceProd", lambda xp, x, a, k: x.prod(axis=a, keepdims=k))
_reduction("ReduceL1", lambda xp, x, a, k: xp.abs(x).sum(axis=a, keepdims=k))
_reduction("ReduceL2", lambda xp, x, a, k: xp.sqrt((x * x).sum(axis=a, keepdims=k)))
_reduction("ReduceSumSquare", lambda xp, x, a, k: (x * x).sum(axis=a, keepdims=k))
_reduction("ReduceLogSum", lambda xp, x, a, k: xp.log(x.sum(axis=a, keepdims=k)))


def _logsumexp(xp, x, a, k):
    if any(x.shape[i] == 0 for i in a):
        return _identity_of_empty(xp, x, a, k, -np.inf)          # log(0)
    m = x.max(axis=a, keepdims=True)
    m = xp.where(xp.isfinite(m), m, m.dtype.type(0))
    y = xp.log(xp.exp(x - m).sum(axis=a, keepdims=True)) + m
    return y if k else y.reshape([d for i, d in enumerate(y.shape) if i not in a])


_reduction("ReduceLogSumExp", _logsumexp)


def _arg(fn_name):
    def kernel(xp, x, axis, keepdims, select_last_index):
        a = norm_axis(axis, x.ndim)
        f = getattr(xp, fn_name)
        if select_last_index:
            idx = x.shape[a] - 1 - f(xp.flip(x, axis=a), axis=a)
        else:
            idx = f(x, axis=a)
        idx = idx.astype(np.int64)
        return xp.expand_dims(idx, a) if keepdims else idx
    return kernel


for _name, _fn in (("ArgMax", "argmax"), ("ArgMin", "argmin")):
    op(f"onnx::{_name}", ("data",), outputs=("reduced",), fresh=True,
       attrs={"axis": Attr(INT, 0), "keepdims": Attr(INT, 1), "select_last_index": Attr(INT, 0)})(_arg(_fn))


@op("onnx::TopK", ("X", "K"), outputs=("Values", "Indices"), static=("K",),
    attrs={"axis": Attr(INT, -1), "largest": Attr(INT, 1), "sorted": Attr(INT, 1)})
def topk(xp, x, k, axis, largest, sorted, n_outputs=2):  # noqa: A002 - ONNX attribute name
    a = norm_axis(axis, x.ndim)
    kk = int(scalar(k))
    if not 0 <= kk <= x.shape[a]:
        raise OpError(f"TopK k={kk} for an axis of size {x.shape[a]}")
    # stable sort: among equal values the lower index comes first, as ONNX asks; for the
    # largest, sorted from the end (no negation: it wraps unsigned integers)
    if largest:
        n = x.shape[a]
        order = (n - 1) - xp.flip(xp.argsort(xp.flip(x, axis=a), axis=a, kind="stable"), axis=a)
    else:
        order = xp.argsort(x, axis=a, kind="stable")
    index = [slice(None)] * x.ndim
    index[a] = slice(0, kk)
    idx = order[tuple(index)]
    vals = xp.take_along_axis(x, idx, axis=a)
    return (vals, idx.astype(np.int64))[:n_outputs]


@op("onnx::Einsum", ("Inputs",), outputs=("Output",), variadic=True, attrs={"equation": Attr(STRING)},
    fresh=True)
def einsum(xp, *xs, equation):
    if not equation:
        raise OpError("Einsum needs an equation")
    return xp.einsum(equation, *xs)
