"""Polarity: MNIST digits are white on black; a dark digit on a light page is inverted.

One rule for every source of images (folders of files, ``.npy``, CSV, IDX, npz):
``--invert auto`` inverts an item whose background is light, ``yes`` every item,
``no`` none. The background is the median pixel away from the edges (a dark frame or
a shadow at the edge of a scan does not decide it): digits cover a minority of an
image, so the median is a background pixel.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

INVERT_MODES = ("auto", "yes", "no")
_EDGE = 0.125          # the share of each side left out when the background is estimated
_SMALL = 32            # images up to this size (MNIST's own format) are looked at whole


def full_scale(items: np.ndarray) -> float:
    """The value of full intensity: 255, or 1.0 for floats already scaled to [0, 1]."""
    if items.dtype.kind == "f" and items.size and float(np.nanmax(items)) <= 1.0:
        return 1.0
    return 255.0


def light_background(items: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Per item of ``items`` (n, h, w): whether its background is light.

    The median of the inner region is compared with half of full intensity. Fast path:
    an item whose mean is under a quarter of full scale cannot have a light median
    (that would need half its pixels above half scale), so MNIST-like items cost one mean.
    """
    n, h, w = items.shape
    scale = full_scale(items) if scale is None else scale
    if min(h, w) > _SMALL:
        mh, mw = int(h * _EDGE), int(w * _EDGE)
        items = items[:, mh:h - mh, mw:w - mw]
    flat = items.reshape(n, -1)
    light = np.zeros(n, bool)
    with np.errstate(over="ignore", invalid="ignore"):     # huge values (an overflow is the model's error)
        maybe = np.flatnonzero(~(flat.mean(axis=1, dtype=np.float64) <= 0.25 * scale))
        if len(maybe):
            light[maybe] = np.median(flat[maybe], axis=1) > 0.5 * scale
    return light


def check_mode(mode: str) -> str:
    if mode not in INVERT_MODES:
        raise DataError(f"invert must be one of {INVERT_MODES}, got {mode!r}")
    return mode


def decide(items: np.ndarray, mode: str) -> np.ndarray:
    """Which items (n, h, w) to invert under ``mode`` (auto | yes | no)."""
    if check_mode(mode) == "auto" and len(items):
        return light_background(items)
    return np.full(len(items), mode == "yes")


def invert(items: np.ndarray, which: np.ndarray, scale: float | None = None) -> np.ndarray:
    """``items`` with the items in ``which`` inverted (full scale minus the value)."""
    if not which.any():
        return items
    scale = full_scale(items) if scale is None else scale
    out = np.array(items, copy=True)
    out[which] = (np.asarray(scale, out.dtype) - out[which]) if out.dtype.kind == "f" else \
        (int(scale) - out[which].astype(np.int64)).clip(0, None).astype(out.dtype)
    return out


def apply_to_dataset(ds, mode: str, size: tuple[int, int]):
    """``ds`` (an array source: ``.npy``, CSV, IDX, npz, the embedded copy) read with the
    polarity rule: each chunk's items are looked at as ``size`` images and inverted as
    ``mode`` says; ``ds.inverted`` records the inverted items (until their chunk is saved).
    Items that are not images of ``size`` are left alone (``yes`` is refused for them)."""
    h, w = size
    if int(np.prod(ds.image_shape)) != h * w or min(h, w) < 8:
        if mode == "yes":
            raise DataError(f"{ds.name}: --invert yes: its items {tuple(ds.image_shape)} are not {h}x{w} images")
        return ds
    check_mode(mode)                                       # refused before any read
    flags: dict[int, bool] = {}
    read = ds.reader

    def reader(a: int, b: int) -> np.ndarray:
        x = read(a, b)
        which = decide(x.reshape(len(x), h, w), mode)
        flags.update((a + int(j), True) for j in np.flatnonzero(which))
        return invert(x, which)

    ds.reader, ds.inverted = reader, flags
    return ds
