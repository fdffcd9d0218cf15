"""Resize (every mode, coordinate mapping, antialias and aspect policy) and the older Upsample.

Resizing is separable: each resized axis is resampled in turn. For an axis, the host
computes, once per shape, which input positions each output position reads and with what
weights (ONNX's reference formulas: nearest with its rounding modes, linear, cubic with
``cubic_coeff_a`` and ``exclude_outside``, their antialiasing filters when shrinking, and
``tf_crop_and_resize``'s region and extrapolation value); the device then gathers and
weights with those cached index and weight arrays, and no value comes back to the host.
"""

from __future__ import annotations

import numpy as np

from . import FLOAT, FLOATS, INT, INTS, STRING, Attr, OpError, check_alloc, device_const, ints, norm_axis, op

_COORD_MODES = ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                "half_pixel_symmetric", "tf_crop_and_resize")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
_POLICIES = ("stretch", "not_larger", "not_smaller")


def _check_resize(a):
    if a["mode"] not in ("nearest", "linear", "cubic"):
        raise OpError(f"Resize mode {a['mode']!r} (expected nearest, linear or cubic)")
    if a["coordinate_transformation_mode"] not in _COORD_MODES:
        raise OpError(f"Resize coordinate_transformation_mode {a['coordinate_transformation_mode']!r}; expected one "
                      f"of {', '.join(_COORD_MODES)}")
    if a["nearest_mode"] not in _NEAREST_MODES:
        raise OpError(f"Resize nearest_mode {a['nearest_mode']!r}")
    if a["antialias"] and a["mode"] == "nearest":
        raise OpError("Resize antialias=1 applies to linear and cubic modes, not nearest")
    if a["keep_aspect_ratio_policy"] not in _POLICIES:
        raise OpError(f"Resize keep_aspect_ratio_policy {a['keep_aspect_ratio_policy']!r}; expected one of "
                      f"{', '.join(_POLICIES)}")


# --------------------------------------------------------------------------- #
# One axis, on the host
# --------------------------------------------------------------------------- #
def _source_coords(n_out, n_in, scale, mode, roi):
    """Source coordinate of every output position; the positions a crop extrapolates."""
    y = np.arange(n_out, dtype=np.float64)
    width = scale * n_in                     # the output width before rounding
    if mode == "align_corners":
        return (np.zeros(n_out) if width == 1 else y * (n_in - 1) / (width - 1)), None
    if mode == "asymmetric":
        return y / scale, None
    if mode == "tf_crop_and_resize":
        lo, hi = roi
        x = np.full(n_out, (hi - lo) * (n_in - 1) / 2) if width == 1 else y * (hi - lo) * (n_in - 1) / (width - 1)
        x = x + lo * (n_in - 1)
        return x, (x < 0) | (x > n_in - 1)
    if mode == "pytorch_half_pixel":
        return (np.full(n_out, -0.5) if width == 1 else (y + 0.5) / scale - 0.5), None
    if mode == "tf_half_pixel_for_nn":
        return (y + 0.5) / scale, None
    if mode == "half_pixel_symmetric":
        offset = n_in / 2 * (1 - n_out / width)
        return offset + (y + 0.5) / scale - 0.5, None
    return (y + 0.5) / scale - 0.5, None      # half_pixel


def _nearest_index(x, n_in, mode, scale=1.0):
    if mode == "simple":                     # Upsample and Resize-10 (ONNX Runtime's rule)
        mode = "ceil" if scale < 1 else "floor"
    if mode == "floor":
        i = np.floor(x)
    elif mode == "ceil":
        i = np.ceil(x)
    elif mode == "round_prefer_ceil":
        i = np.floor(x + 0.5)
    else:                                    # round_prefer_floor
        i = np.ceil(x - 0.5)
    return np.clip(i, 0, n_in - 1).astype(np.int64)


def _cubic(t, a):
    """The cubic convolution kernel at distances ``t``."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _coefficients(ratio, scale, mode, cubic_a, antialias):
    """Weights of the neighbours of each output position (rows), left to right;
    ``ratio`` in (0, 1] is how far the source coordinate lies past its left neighbour."""
    r = ratio[:, None]
    if antialias and scale < 1:              # the filter widened by 1/scale when shrinking
        reach = 1 if mode == "linear" else 2
        start = int(np.floor(-reach / scale) + 1)
        taps = (np.arange(start, 2 - start) - r) * scale
        w = np.clip(1 - np.abs(taps), 0, 1) if mode == "linear" else _cubic(taps, cubic_a)
        return w / w.sum(axis=1, keepdims=True)
    if mode == "linear":
        return np.concatenate([1 - r, r], axis=1)
    return _cubic(np.concatenate([r + 1, r, 1 - r, 2 - r], axis=1), cubic_a)


def _neighbours(x, k):
    """The k input positions nearest each source coordinate (ties to the smaller), as
    ONNX's reference picks them (positions may lie outside the input)."""
    pad = int(np.ceil(k / 2))
    xp_ = x + pad
    p = np.floor(xp_).astype(np.int64)
    frac = xp_ - p
    if k % 2 == 0:
        offset = np.where(frac == 0, -(k // 2), -(k // 2) + 1)
    else:
        base = -((k - 1) // 2)
        offset = np.where(frac <= 0.5, base, base + 1)
    return (p + offset)[:, None] + np.arange(k)[None, :] - pad


def axis_taps(n_in, n_out, scale, mode, coord_mode, cubic_a=-0.75, exclude_outside=0, antialias=0, roi=(0.0, 1.0)):
    """(indices (n_out, k), weights (n_out, k), extrapolated positions or None) of one axis."""
    x, extrapolated = _source_coords(n_out, n_in, scale, coord_mode, roi)
    left = np.floor(x)
    ratio = np.where(x == left, 1.0, x - left)
    w = _coefficients(ratio, scale, mode, cubic_a, antialias)
    idx = _neighbours(x, w.shape[1])
    if exclude_outside:
        w = np.where((idx < 0) | (idx >= n_in), 0.0, w)
        total = w.sum(axis=1, keepdims=True)
        w = w / np.where(total == 0, 1.0, total)
    return np.clip(idx, 0, n_in - 1), w, extrapolated


# --------------------------------------------------------------------------- #
# The kernels
# --------------------------------------------------------------------------- #
def _target(x, scales, sizes, axes, policy):
    """(output shape, per-axis scale) for every axis of ``x``."""
    rank = x.ndim
    ax = list(range(rank)) if axes is None else [norm_axis(a, rank) for a in axes]
    sc = None if scales is None or np.asarray(scales).size == 0 else [float(s) for s in np.asarray(scales).ravel()]
    sz = None if sizes is None or np.asarray(sizes).size == 0 else ints(sizes)
    if (sc is None) == (sz is None):
        raise OpError("Resize needs exactly one of scales and sizes")
    if len(sc or sz) != len(ax):
        raise OpError(f"Resize: {len(sc or sz)} {'scales' if sc else 'sizes'} for {len(ax)} axes")
    scale = [1.0] * rank
    shape = list(x.shape)
    if sc is not None:
        for a, s in zip(ax, sc):
            if s <= 0:
                raise OpError(f"Resize scale {s} (scales must be positive)")
            scale[a], shape[a] = s, int(np.floor(x.shape[a] * s))
        return shape, scale, ax
    if policy == "stretch":
        for a, n in zip(ax, sz):
            scale[a], shape[a] = n / x.shape[a], n
        return shape, scale, ax
    ratios = [n / x.shape[a] for a, n in zip(ax, sz)]
    s = min(ratios) if policy == "not_larger" else max(ratios)
    for a in ax:
        scale[a], shape[a] = s, int(s * x.shape[a] + 0.5)
    return shape, scale, ax


def _resample(xp, x, shape, scale, axes, mode, coord_mode, nearest_mode, roi=None, cubic_a=-0.75,
              exclude_outside=0, antialias=0, extrapolation_value=0.0):
    check_alloc(shape)
    work = x if x.dtype.kind == "f" else x.astype(np.float64)
    rank = x.ndim
    for a in axes:
        n_in, n_out, s = x.shape[a], shape[a], scale[a]
        span = (0.0, 1.0) if roi is None else (float(roi[a]), float(roi[a + rank]))
        if n_in == n_out and s == 1.0 and span == (0.0, 1.0):
            continue
        key = (n_in, n_out, s, mode, coord_mode, nearest_mode, span, cubic_a, exclude_outside, antialias)
        work = _resample_axis(xp, work, a, key, extrapolation_value)
    if work is x:
        return x.copy()
    if x.dtype.kind in "iub":                 # integer images: rounded and clipped back, as ONNX's reference
        info = np.iinfo(x.dtype)
        work = xp.clip(xp.round(work), info.min, info.max)
    return work.astype(x.dtype, copy=False)


def _resample_axis(xp, y, a, key, extrapolation_value):
    n_in, n_out, s, mode, coord_mode, nearest_mode, span, cubic_a, exclude_outside, antialias = key
    shape_w = [1] * y.ndim
    shape_w[a] = n_out
    if mode == "nearest":
        x, extra = _source_coords(n_out, n_in, s, coord_mode, span)
        idx = device_const(xp, ("resize-n",) + key, lambda: _nearest_index(x, n_in, nearest_mode, s))
        out = xp.take(y, idx, axis=a)
    else:
        idx_h, w_h, extra = axis_taps(n_in, n_out, s, mode, coord_mode, cubic_a, exclude_outside, antialias, span)
        k = idx_h.shape[1]
        idx = device_const(xp, ("resize-i",) + key, lambda: idx_h.ravel())
        w = device_const(xp, ("resize-w", y.dtype.str, a, y.ndim) + key,
                         lambda: w_h.astype(y.dtype).reshape(shape_w[:a + 1] + [k] + shape_w[a + 1:]))
        g = xp.take(y, idx, axis=a)
        g = g.reshape(y.shape[:a] + (n_out, k) + y.shape[a + 1:])
        out = (g * w).sum(axis=a + 1)
    if extra is not None and extra.any():
        mask = device_const(xp, ("resize-x", a, y.ndim) + key, lambda: extra.reshape(shape_w))
        out = xp.where(mask, out.dtype.type(extrapolation_value), out)
    return out


@op("onnx::Resize", ("X",), optional=("roi", "scales", "sizes"), static=("roi", "scales", "sizes"),
    check=_check_resize, fresh=True, since=11,
    attrs={"mode": Attr(STRING, "nearest"), "coordinate_transformation_mode": Attr(STRING, "half_pixel"),
           "nearest_mode": Attr(STRING, "round_prefer_floor"), "cubic_coeff_a": Attr(FLOAT, -0.75),
           "exclude_outside": Attr(INT, 0), "extrapolation_value": Attr(FLOAT, 0.0), "antialias": Attr(INT, 0),
           "axes": Attr(INTS), "keep_aspect_ratio_policy": Attr(STRING, "stretch")})
def resize(xp, x, roi=None, scales=None, sizes=None, mode="nearest", coordinate_transformation_mode="half_pixel",
           nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0,
           antialias=0, axes=None, keep_aspect_ratio_policy="stretch"):
    shape, scale, ax = _target(x, scales, sizes, axes, keep_aspect_ratio_policy)
    full_roi = None
    if coordinate_transformation_mode == "tf_crop_and_resize":
        r = None if roi is None else np.asarray(roi, np.float64).ravel()
        if r is None or r.size != 2 * len(ax):
            raise OpError(f"Resize tf_crop_and_resize needs a roi of {2 * len(ax)} values (start and end per axis)")
        full_roi = [0.0] * x.ndim + [1.0] * x.ndim
        for i, a in enumerate(ax):
            full_roi[a], full_roi[a + x.ndim] = r[i], r[i + len(ax)]
    return _resample(xp, x, shape, scale, ax, mode, coordinate_transformation_mode, nearest_mode, full_roi,
                     cubic_coeff_a, exclude_outside, antialias, extrapolation_value)


def _check_upsample(a):
    if a["mode"] not in ("nearest", "linear"):
        raise OpError(f"Upsample mode {a['mode']!r} (expected nearest or linear)")


@op("onnx::Upsample", ("X",), optional=("scales",), static=("scales",), check=_check_upsample, fresh=True, since=7,
    attrs={"mode": Attr(STRING, "nearest"), "scales": Attr(FLOATS)})
def upsample(xp, x, scales_in=None, mode="nearest", scales=None):
    """Opset 7-9 Upsample (and Resize 10): asymmetric coordinates; nearest takes the
    floor of the source coordinate when enlarging and its ceiling when shrinking (what
    ONNX Runtime does)."""
    if (scales_in is None) == (scales is None):
        raise OpError("Upsample needs scales (as input or attribute)")
    sc = [float(s) for s in (np.asarray(scales_in).ravel() if scales_in is not None else scales)]
    if len(sc) != x.ndim:
        raise OpError(f"Upsample: {len(sc)} scales for rank {x.ndim}")
    shape = [int(np.floor(n * s)) for n, s in zip(x.shape, sc)]
    return _resample(xp, x, shape, sc, range(x.ndim), mode, "asymmetric", "simple")


@op("onnx::Resize", ("X", "scales"), static=("scales",), check=_check_upsample, fresh=True, since=10, until=10,
    attrs={"mode": Attr(STRING, "nearest")})
def resize_10(xp, x, scales, mode="nearest"):
    """Opset 10 Resize: the scales alone, as Upsample-9 (asymmetric coordinates)."""
    return upsample(xp, x, scales, mode=mode)
