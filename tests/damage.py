"""Scans as they arrive, generated from MNIST test digits: a dark digit on a light page,
larger than MNIST and off-centre, then one kind of damage.

``scan(digit, i)`` is the clean page; :data:`DAMAGE` maps each kind of damage to a
function ``(page, i) -> page`` (``i`` seeds the item's random choices, so a folder is
the same on every run). Used by the preprocessing tests and by the README's table.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

PAPER = 232


def scan(digit: np.ndarray, i: int, size: int = 100) -> np.ndarray:
    """A white-on-black 28x28 MNIST digit as a dark digit on a ``size``-pixel light page:
    scaled to 60% of the page, placed off-centre, paper with a little grain."""
    rng = np.random.default_rng(i)
    page = np.full((size, size), PAPER, np.float64) + rng.normal(0, 3, (size, size))
    side = int(size * 0.6)
    ink = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR), np.float64) / 255
    y, x = rng.integers(size // 10, size - side - size // 10 + 1, 2)
    page[y:y + side, x:x + side] *= 1 - 0.9 * ink
    return np.clip(page, 0, 255).round().astype(np.uint8)


def frame(width: int):
    """A black frame ``width`` pixels wide round the page (a scanner's lid, a photo's border)."""
    def damage(page: np.ndarray, i: int) -> np.ndarray:
        out = page.copy()
        out[:width], out[-width:], out[:, :width], out[:, -width:] = 0, 0, 0, 0
        return out
    return damage


def shadow(page: np.ndarray, i: int) -> np.ndarray:
    """A shadow falling off the left edge: nearly black at the edge, gone a quarter in."""
    w = page.shape[1]
    ramp = np.clip(np.arange(w) / (0.25 * w), 0, 1) * 0.9 + 0.1
    return (page * ramp[None, :]).round().astype(np.uint8)


def margins(page: np.ndarray, i: int) -> np.ndarray:
    """The page inside a larger one (320 x 260): wide margins, the digit small and off-centre."""
    out = np.full((260, 320), PAPER, np.uint8)
    y, x = np.random.default_rng(30_000 + i).integers(0, (260 - page.shape[0], 320 - page.shape[1]))
    out[y:y + page.shape[0], x:x + page.shape[1]] = page
    return out


def noise(page: np.ndarray, i: int) -> np.ndarray:
    """Sensor noise (Gaussian, sigma 25) and 1% salt-and-pepper specks."""
    rng = np.random.default_rng(10_000 + i)
    out = page + rng.normal(0, 25, page.shape)
    specks = rng.random(page.shape)
    out[specks < 0.005], out[specks > 0.995] = 0, 255
    return np.clip(out, 0, 255).round().astype(np.uint8)


def rotation(page: np.ndarray, i: int) -> np.ndarray:
    """The page turned by up to 15 degrees either way (paper fills the corners)."""
    angle = np.random.default_rng(20_000 + i).uniform(-15, 15)
    return np.asarray(Image.fromarray(page).rotate(angle, Image.Resampling.BILINEAR, fillcolor=PAPER))


def jpeg(page: np.ndarray, i: int, quality: int = 25) -> np.ndarray:
    """Saved as a JPEG of quality 25 and read back."""
    buf = io.BytesIO()
    Image.fromarray(page).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


DAMAGE = {"clean": lambda page, i: page, "frame 2 px": frame(2), "frame 8 px": frame(8), "shadow": shadow,
          "margins": margins, "noise": noise, "rotation": rotation, "jpeg q25": jpeg}


def damaged_folder(root, digits: np.ndarray, labels: np.ndarray, kind: str):
    """A folder of PNG scans with ``kind`` of damage, in digit-named sub-folders."""
    for i, (digit, label) in enumerate(zip(digits, labels)):
        sub = root / str(int(label))
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(DAMAGE[kind](scan(digit, i), i)).save(sub / f"{i:05d}.png")
    return root
