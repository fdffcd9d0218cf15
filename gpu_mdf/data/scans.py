"""A scanned or photographed digit (light strokes on a dark background, after polarity)
cleaned down to the digit alone, the way scans arrive: frames, shadows, margins, specks.

1. :func:`working_copy`: at most :data:`WORK` pixels a side (the digit ends up 20x20;
   larger images only cost time);
2. :func:`remove_background`: the background estimated away from the strokes (a grey
   opening wider than any stroke, smoothed) and subtracted, so a shadow or an uneven
   page goes to black while strokes keep their intensity;
3. :func:`ink_mask`: Otsu's threshold between background and strokes;
4. :func:`components` and :func:`digit_components`: 8-connected components; those
   touching the image's edge (a frame, the rest of a shadow, a neighbour's digit cut
   by the crop) are left out unless nothing else is there; the largest remaining one is
   the digit, with the pieces of it that lie near it (a broken stroke, the bar of a 5);
   specks far from it or much smaller are dropped.
"""

from __future__ import annotations

import numpy as np

WORK = 128              # longest side of the working copy
_PIECE = 0.08           # a piece of the digit: at least this share of the largest component's area
_NEAR = 0.35            # ... and within this share of the digit's size of its bounding box
_SPECK = 0.005          # a component under this share of the image is not a digit on its own


def working_copy(a: np.ndarray) -> np.ndarray:
    """``a`` as float, at most :data:`WORK` pixels a side."""
    from PIL import Image
    im = Image.fromarray(a.astype(np.uint8, copy=False))
    h, w = a.shape
    if max(h, w) > WORK:
        s = WORK / max(h, w)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BOX)
    return np.asarray(im, np.float64)


def _running(a: np.ndarray, k: int, fn) -> np.ndarray:
    """``fn`` (np.minimum or np.maximum) over windows of ``k`` rows centred on each row,
    edges repeated: windows of 1, 2, 4... rows combined, a few whole-array operations."""
    r = k // 2
    n = len(a)
    width, span = np.concatenate([np.repeat(a[:1], r, 0), a, np.repeat(a[-1:], r, 0)]), 1
    while span * 2 <= k:
        width, span = fn(width[:-span], width[span:]), span * 2
    return fn(width[:n], width[k - span:k - span + n])


def _rank(a: np.ndarray, k: int, fn) -> np.ndarray:
    """A ``k`` x ``k`` min or max filter (``fn``: np.minimum or np.maximum), edges repeated."""
    return _running(_running(a, k, fn).T, k, fn).T


def remove_background(a: np.ndarray) -> np.ndarray:
    """``a`` minus its background: a grey opening (min then max filter) wider than a
    stroke keeps what is broad (page, shadow) and removes what is thin (strokes)."""
    k = max(3, (min(a.shape) // 3) | 1)
    padded = np.pad(a, k, mode="edge")                     # what rises to the edge (a shadow) is background too
    background = _rank(_rank(padded, k, np.minimum), k, np.maximum)[k:-k, k:-k]
    background = _rank(background, 3, np.maximum)              # no halo where strokes met the opening
    return np.clip(a - background, 0, None)


def ink_mask(fg: np.ndarray) -> np.ndarray:
    """Strokes: above Otsu's threshold of ``fg`` (and above a tenth of its top level)."""
    top = float(fg.max())
    if top <= 0:
        return np.zeros(fg.shape, bool)
    hist, edges = np.histogram(fg, bins=64, range=(0, top))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(invalid="ignore", divide="ignore"):
        between = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    t = centres[int(np.nanargmax(between))] if np.isfinite(between).any() else top / 2
    return fg > max(t, 0.1 * top)


def components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of ``mask`` (0: background; a component's label is
    one more than the flat index of one of its pixels). Each pass takes the smallest
    label around every pixel, hands it to the pixel its label names (hooking) and
    follows labels to their end (pointer jumping): a few passes of whole-array work."""
    h, w = mask.shape
    big = np.int32(h * w + 1)
    lab = np.where(mask, np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w), big)
    flat, inside, outside = lab.ravel(), np.flatnonzero(mask), ~mask
    while True:
        before = flat[inside]
        low = _rank(lab, 3, np.minimum)
        low[outside] = big
        around = low.ravel()[inside]
        np.minimum.at(flat, before - 1, around)            # hooking: a label's pixel takes the smaller one
        flat[inside] = np.minimum(flat[inside], around)
        while True:                                        # pointer jumping
            jumped = flat[flat[inside] - 1]
            if np.array_equal(jumped, flat[inside]):
                break
            flat[inside] = jumped
        if np.array_equal(flat[inside], before):
            return np.where(mask, lab, 0)


def digit_components(labels: np.ndarray) -> np.ndarray:
    """The mask of the digit among the components ``labels``: see the module."""
    ids, area = np.unique(labels[labels > 0], return_counts=True)
    if not len(ids):
        return np.zeros(labels.shape, bool)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inner = ~np.isin(ids, edge)
    if inner.any() and area[inner].max() >= _SPECK * labels.size:
        ids, area = ids[inner], area[inner]
    main = ids[np.argmax(area)]
    keep = labels == main
    ys, xs = np.nonzero(keep)
    size = max(np.ptp(ys), np.ptp(xs)) + 1
    box = (ys.min() - _NEAR * size, ys.max() + _NEAR * size, xs.min() - _NEAR * size, xs.max() + _NEAR * size)
    for i, n in zip(ids, area):
        if i == main or n < _PIECE * area.max():
            continue
        py, px = np.nonzero(labels == i)
        if py.max() >= box[0] and py.min() <= box[1] and px.max() >= box[2] and px.min() <= box[3]:
            keep |= labels == i
    return keep


def clean_scan(a: np.ndarray, refine: bool = True) -> np.ndarray:
    """Light strokes on a dark background -> the digit alone, background 0 and strokes
    at full intensity (uint8, at the working size). A digit found in a copy made
    smaller (a small digit on a large page) is cleaned again from the full-size crop
    around it, so it keeps its detail."""
    work = working_copy(a)
    fg = remove_background(work)
    mask = ink_mask(fg)
    keep = digit_components(components(mask)) if mask.any() else mask
    if not keep.any():
        return np.zeros(fg.shape, np.uint8)
    if refine and work.shape != a.shape:
        crop = _crop_around(a, keep, a.shape[0] / work.shape[0], a.shape[1] / work.shape[1])
        if max(crop.shape) < max(a.shape) * 0.75:
            return clean_scan(crop, refine=False)
    near = _rank(keep.astype(np.uint8), 3, np.maximum).astype(bool)     # the strokes' anti-aliased rims
    digit = np.where(near, fg, 0.0)
    top = float(np.percentile(digit[keep], 95))
    return np.clip(digit * (255.0 / top), 0, 255).round().astype(np.uint8) if top > 0 else \
        np.zeros(fg.shape, np.uint8)


def _crop_around(a: np.ndarray, keep: np.ndarray, sy: float, sx: float) -> np.ndarray:
    """The part of ``a`` round the mask ``keep`` of its smaller copy (scaled by ``sy``,
    ``sx``), with a margin of half the digit's size for the background estimate."""
    ys, xs = np.nonzero(keep)
    pad = 0.5 * max(np.ptp(ys) + 1, np.ptp(xs) + 1)
    y0, y1 = max(0, int((ys.min() - pad) * sy)), min(a.shape[0], int(np.ceil((ys.max() + 1 + pad) * sy)))
    x0, x1 = max(0, int((xs.min() - pad) * sx)), min(a.shape[1], int(np.ceil((xs.max() + 1 + pad) * sx)))
    return a[y0:y1, x0:x1]
