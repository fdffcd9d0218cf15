"""Folders of image files as people have them -> MNIST-format digits.

PNG, JPEG, BMP, TIFF, GIF (first frame) through Pillow; colour and transparency
converted to greyscale; polarity decided from the background away from the edges
(:mod:`.polarity`: MNIST digits are white on black, so a dark digit on a light page,
the usual scan or drawing, is inverted); then the scan is cleaned down to the digit
(:mod:`.scans`: background, frames, shadows, margins and specks removed) and brought
to MNIST's own format (LeCun et al.): the digit's bounding box fitted into a 20x20 box
keeping its aspect ratio, placed in the 28x28 field with its centre of mass at the
centre. An image already of the target size is taken to be in MNIST's format (polarity
and contrast only). Labels come from digit-named sub-folders.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import polarity
from .dataset import Dataset
from .scans import clean_scan
from .sources import OpenOptions, PathSource, source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def load_grey(path: Path) -> np.ndarray:
    """A file as a uint8 greyscale array; transparency composited onto white."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.seek(0)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float64)
                hi = a.max() or 1.0
                return (a * (255.0 / hi)).astype(np.uint8)
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def dark_on_light(a: np.ndarray) -> bool:
    """True when the background is light: a dark digit on a light page (see :mod:`.polarity`)."""
    return bool(polarity.light_background(a[None])[0])


def _stretch(a: np.ndarray) -> np.ndarray:
    """Background to 0 and the strokes to full intensity, as in MNIST (an image of the
    target size: its background is the median of its edge)."""
    h, w = a.shape
    k = max(1, min(h, w) // 14)
    bg = float(np.median(np.concatenate([a[:k].ravel(), a[-k:].ravel(), a[:, :k].ravel(), a[:, -k:].ravel()])))
    if bg <= 0:                             # a black background already (MNIST's own files): as it is
        return a
    top = float(np.percentile(a, 99.5))
    if top - bg < 16:                       # no digit to speak of: keep it as it is
        return a
    return np.clip((a.astype(np.float64) - bg) * (255.0 / (top - bg)), 0, 255).round().astype(np.uint8)


def to_mnist(a: np.ndarray, size: tuple[int, int] = (28, 28), invert: str = "auto") -> tuple[np.ndarray, bool]:
    """A greyscale image -> (uint8 digit in MNIST format of ``size``, whether it was inverted).

    An image of the target size is taken to be in MNIST's format already (polarity and
    contrast only); any other is a scan, cleaned by :func:`~.scans.clean_scan` (frames,
    shadows, margins and specks removed) and then fitted and centred as MNIST's were.
    """
    flip = bool(polarity.decide(a[None], invert)[0])
    if flip:
        a = 255 - a
    if a.shape == tuple(size):
        return _stretch(a).astype(np.uint8, copy=False), flip
    return _fit_and_centre(clean_scan(a), size), flip


def _fit_and_centre(a: np.ndarray, size) -> np.ndarray:
    from PIL import Image
    h, w = size
    box = round(min(h, w) * 20 / 28)               # MNIST: 20x20 inside 28x28
    mask = a > 25                                    # the digit (the background is 0 after _stretch)
    if not mask.any():
        return np.zeros(size, np.uint8)           # a blank image stays blank
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    ch, cw = crop.shape
    scale = box / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    small = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.Resampling.LANCZOS), dtype=np.float64)
    small = np.clip(small, 0, 255)
    total = small.sum()
    if total <= 0:
        return np.zeros(size, np.uint8)
    yy, xx = np.mgrid[0:nh, 0:nw]
    cy, cx = (yy * small).sum() / total, (xx * small).sum() / total
    top, left = int(round(h / 2 - 0.5 - cy)), int(round(w / 2 - 0.5 - cx))
    out = np.zeros(size, np.float64)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + nh, h), min(left + nw, w)
    out[y0:y1, x0:x1] = small[y0 - top:y1 - top, x0 - left:x1 - left]
    return np.round(out).astype(np.uint8)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@source(folder=True, fallback=True)
class ImageFolder(PathSource):
    """A folder of image files (any folder that is not an IDX folder), each brought to
    MNIST's format when it is read: any size, colour or polarity; a file that cannot be
    read fails alone (its own error)."""

    def open(self, options: OpenOptions) -> Dataset:
        folder, size, invert = self.path, tuple(options.image_size), options.invert
        files = image_files(folder)
        if not files:
            raise DataError(f"{folder}: no image files (.png, .jpg, .bmp, .tif, .gif) in this folder")
        digit_dirs = all(p.parent != folder and re.fullmatch(r"\d", p.parent.name) for p in files)
        labels = np.array([int(p.parent.name) for p in files]) if digit_dirs else None
        inverted: dict[int, bool] = {}

        def reader(a: int, b: int) -> np.ndarray:
            out = np.empty((b - a,) + size, np.uint8)
            for i, p in enumerate(files[a:b]):
                out[i], inverted[a + i] = to_mnist(load_grey(p), size, invert)
            return out

        return Dataset(folder.name, len(files), size, np.dtype(np.uint8), reader, labels,
                       item_names=lambda i: str(files[i]), inverted=inverted)
